"""Read and write CLTs in circuit-tracer's on-disk format (and per-layer transcoder sets).

CLT folder layout (``model_kind: cross_layer_transcoder``)::

    config.yaml
    W_enc_{i}.safetensors   W_enc_{i} [F, D], b_enc_{i} [F], b_dec_{i} [D], threshold_{i} [F]?
    W_dec_{i}.safetensors   W_dec_{i} [F, L - i, D]

PLT folder layout (``model_kind: transcoder_set``)::

    config.yaml
    layer_{i}.safetensors   W_enc [F, D], W_dec [F, D], b_enc [F], b_dec [D],
                            activation_function.threshold [F]?  (W_skip ignored)

n_layers, F and D come from the tensor shapes, never from the yaml.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

from pie_lib.clt.lazy import LazyDecoder, SafetensorsRows, read_safetensors_header
from pie_lib.clt.transcoder import Activation, CLTConfig, CrossLayerTranscoder
from pie_lib.errors import CLTFormatError, WeightsUnavailableError

#: CLTs whose decoders hold fewer values than this are loaded whole (the toy world, tests).
EAGER_DECODER_VALUES = 50_000_000


def resolve_folder(path_or_id: str | os.PathLike) -> Path:
    """A local folder, or a Hugging Face repo id downloaded (or found in the local HF cache)."""
    p = Path(path_or_id).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise CLTFormatError(f"{p} is a file; pass the folder that holds config.yaml and the safetensors files")
    s = str(path_or_id)
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", s):
        raise WeightsUnavailableError(f"CLT {s!r}: no such local folder, and not a Hugging Face repo id (owner/name)")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(s, allow_patterns=["*.yaml", "*.safetensors"]))
    except Exception as exc:  # offline, gated, missing
        from pie_lib.provenance import hub_unreachable

        raise WeightsUnavailableError(hub_unreachable("CLT", s, exc)) from None


#: Hook names pie_lib can honour. It reads the residual stream before the MLP norm and writes the
#: MLP output (spec §1); a transcoder trained elsewhere would be applied at the wrong place.
#: TransformerLens' ``hook_mlp_in`` is the same tensor as ``hook_resid_mid`` (taken before ln2).
INPUT_HOOKS = ("hook_resid_mid", "hook_mlp_in")
OUTPUT_HOOKS = ("hook_mlp_out",)
_BLOCK_PREFIX = re.compile(r"^blocks\.(\{layer\}|\{l\}|\d+)\.")
CONFIG_HELP = (
    "write config.yaml with model_kind (cross_layer_transcoder or transcoder_set), "
    "feature_input_hook: hook_resid_mid and feature_output_hook: hook_mlp_out"
)


def _hook(raw: dict, key: str, allowed: tuple[str, ...], cfg_path: Path) -> str:
    value = raw.get(key)
    if value is None:
        raise CLTFormatError(
            f"{cfg_path}: no {key}; pie_lib does not guess where a transcoder reads and writes -- "
            f"add '{key}: {allowed[0]}' if that is where it was trained"
        )
    if not isinstance(value, str) or _BLOCK_PREFIX.sub("", value) not in allowed:
        raise CLTFormatError(
            f"{cfg_path}: {key} {value!r} is not supported; pie_lib's transcoders read hook_resid_mid and write "
            "hook_mlp_out -- use a transcoder trained on those hooks"
        )
    return value


def read_config(folder: Path) -> CLTConfig:
    """Parse and check ``config.yaml``; nothing is guessed (a missing or odd key is an error)."""
    cfg_path = folder / "config.yaml"
    if not cfg_path.is_file():
        raise CLTFormatError(
            f"{cfg_path}: missing; pie_lib does not guess a transcoder's kind and hooks -- " + CONFIG_HELP
        )
    try:
        raw = yaml.safe_load(cfg_path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise CLTFormatError(f"{cfg_path}: not UTF-8 text (byte offset {exc.start}); {CONFIG_HELP}") from None
    except yaml.YAMLError as exc:
        raise CLTFormatError(f"{cfg_path}: invalid YAML ({_one_line(exc)}); {CONFIG_HELP}") from None
    except RecursionError:
        raise CLTFormatError(f"{cfg_path}: invalid YAML (nested too deeply); {CONFIG_HELP}") from None
    if not isinstance(raw, dict):
        raise CLTFormatError(
            f"{cfg_path}: expected a mapping of keys to values, got {type(raw).__name__}; " + CONFIG_HELP
        )
    kind = raw.get("model_kind")
    if kind is None:
        raise CLTFormatError(
            f"{cfg_path}: no model_kind; add 'model_kind: cross_layer_transcoder' (W_enc_<i>/W_dec_<i> "
            "files) or 'model_kind: transcoder_set' (layer_<i> files)"
        )
    if kind not in ("cross_layer_transcoder", "transcoder_set"):
        raise CLTFormatError(
            f"{cfg_path}: model_kind {kind!r} is not supported; expected cross_layer_transcoder or transcoder_set"
        )
    act_raw = raw.get("activation", raw.get("activation_function", "relu"))
    if act_raw is None:
        act_raw = "relu"
    if not isinstance(act_raw, str):
        raise CLTFormatError(f"{cfg_path}: activation {act_raw!r} must be a name (relu, jumprelu, topk)")
    act = {"jump_relu": "jumprelu"}.get(act_raw.lower(), act_raw.lower())
    if act not in ("relu", "jumprelu", "topk"):
        raise CLTFormatError(f"{cfg_path}: activation {act_raw!r} is not supported (relu, jumprelu, topk)")
    k = raw.get("k")
    if act == "topk":
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise CLTFormatError(
                f"{cfg_path}: activation topk needs k, a positive integer (got {k!r}); add e.g. 'k: 64'"
            )
    elif k is not None and (isinstance(k, bool) or not isinstance(k, int)):
        raise CLTFormatError(f"{cfg_path}: k {k!r} must be a positive integer")
    model_name = raw.get("model_name")
    if model_name is not None and not isinstance(model_name, str):
        raise CLTFormatError(f"{cfg_path}: model_name {model_name!r} must be a string (a Hugging Face id)")
    known = {"model_kind", "feature_input_hook", "feature_output_hook", "model_name", "activation", "k"}
    return CLTConfig(
        model_kind=kind,
        feature_input_hook=_hook(raw, "feature_input_hook", INPUT_HOOKS, cfg_path),
        feature_output_hook=_hook(raw, "feature_output_hook", OUTPUT_HOOKS, cfg_path),
        model_name=model_name,
        activation=act,  # type: ignore[arg-type]
        k=k,
        extra={str(k_): v for k_, v in raw.items() if k_ not in known},
    )


def _one_line(exc: BaseException, limit: int = 200) -> str:
    lines = str(exc).strip().splitlines()
    return " ".join(ln.strip() for ln in lines)[:limit] if lines else type(exc).__name__


def _layer_files(folder: Path, pattern: str) -> list[int]:
    rx = re.compile(pattern)
    found = sorted(int(m.group(1)) for f in folder.iterdir() if (m := rx.fullmatch(f.name)))
    if not found:
        return []
    missing = sorted(set(range(max(found) + 1)) - set(found))
    if missing:
        raise CLTFormatError(
            f"{folder}: layer file(s) for layer {missing} are missing (found layers {found}); "
            "the download is incomplete -- fetch the folder again"
        )
    return found


def _check_finite(t: torch.Tensor, where: str) -> None:
    # min and max are NaN when any value is, and +-inf when any value is: one pass, no [n] mask (~20x faster)
    if t.numel() and not all(bool(torch.isfinite(v)) for v in torch.aminmax(t)):
        raise CLTFormatError(f"{where} contains NaN or Inf values; the checkpoint is corrupt")


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    read_safetensors_header(path)  # clear errors for truncated/corrupt files
    try:
        return load_file(str(path))
    except Exception as exc:
        raise CLTFormatError(f"{path}: could not be read as safetensors ({exc}); re-download it") from None


def load_clt(
    path_or_id: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    lazy: bool | None = None,
    check_finite: bool = True,
) -> CrossLayerTranscoder:
    """Load a CLT (or PLT set) from a folder or a hub id.

    Args:
        path_or_id: folder with config.yaml + safetensors, or a Hugging Face repo id.
        device, dtype: where the encoders live and where decoder rows are delivered.
        lazy: memory-map decoders and fetch rows on demand. Default: lazy when the decoders hold
            more than :data:`EAGER_DECODER_VALUES` values.
        check_finite: refuse NaN/Inf weights (encoders and biases always; decoders when loaded
            eagerly, and row by row as they are fetched when lazy -- see ``LazyDecoder``).
    Returns:
        A :class:`CrossLayerTranscoder`.
    """
    folder = resolve_folder(path_or_id)
    config = read_config(folder)
    if config.model_kind == "transcoder_set":
        clt = _load_plt(folder, config, check_finite)
    else:
        clt = _load_clt_folder(folder, config, lazy, check_finite)
    return clt.to(device=device, dtype=dtype)


def _load_clt_folder(folder: Path, config: CLTConfig, lazy: bool | None, check_finite: bool) -> CrossLayerTranscoder:
    enc_layers = _layer_files(folder, r"W_enc_(\d+)\.safetensors")
    dec_layers = _layer_files(folder, r"W_dec_(\d+)\.safetensors")
    if not enc_layers:
        raise CLTFormatError(f"{folder}: no W_enc_<i>.safetensors files; is this a circuit-tracer CLT folder?")
    if enc_layers != dec_layers:
        raise CLTFormatError(
            f"{folder}: encoder layers {enc_layers} and decoder layers {dec_layers} differ; a layer file is missing"
        )
    L = len(enc_layers)
    W_enc, b_enc, b_dec, thr = [], [], [], []
    enc: torch.Tensor | None = None  # [L, F, D], filled layer by layer (a stack at the end held the encoders twice)
    for i in range(L):
        path = folder / f"W_enc_{i}.safetensors"
        t = _load_tensors(path)
        for key in (f"W_enc_{i}", f"b_enc_{i}", f"b_dec_{i}"):
            if key not in t:
                raise CLTFormatError(f"{path}: missing tensor {key!r} (found {sorted(t)})")
        w = t.pop(f"W_enc_{i}")
        if i == 0:
            enc = torch.empty((L, *w.shape), dtype=w.dtype)
        if enc is not None and w.shape == enc.shape[1:] and w.dtype == enc.dtype:
            enc[i] = w
            w = enc[i]  # the layer's file tensor is freed with ``t``
        else:
            enc = None  # shapes or dtypes differ: checked below, stacked as before
        W_enc.append(w)
        # copies: the file's tensors share one memory map, which a kept view would hold, W_enc's pages included
        b_enc.append(t[f"b_enc_{i}"].clone())
        b_dec.append(t[f"b_dec_{i}"].clone())
        if f"threshold_{i}" in t:
            thr.append(t[f"threshold_{i}"].clone())
        del t, w
    if thr and len(thr) != L:
        raise CLTFormatError(f"{folder}: threshold_<i> is stored for {len(thr)} of {L} layers; expected all or none")
    F, D = W_enc[0].shape
    for i in range(L):
        where = folder / f"W_enc_{i}.safetensors"
        for name, t in ((f"W_enc_{i}", W_enc[i]), (f"b_enc_{i}", b_enc[i]), (f"b_dec_{i}", b_dec[i])):
            if not t.is_floating_point():
                raise CLTFormatError(f"{where}: {name} has dtype {t.dtype}, expected a floating-point dtype")
        _expect(W_enc[i].shape, (F, D), f"{where}: W_enc_{i}")
        _expect(b_enc[i].shape, (F,), f"{where}: b_enc_{i}")
        _expect(b_dec[i].shape, (D,), f"{where}: b_dec_{i}")
        if thr:
            _expect(thr[i].shape, (F,), f"{where}: threshold_{i}")
    decs = [SafetensorsRows(folder / f"W_dec_{i}.safetensors", f"W_dec_{i}") for i in range(L)]
    for i, d in enumerate(decs):
        _expect(d.shape, (F, L - i, D), f"{d.path}: W_dec_{i}")
    total = sum(d.shape[0] * d.shape[1] * d.shape[2] for d in decs)
    if lazy is None:
        lazy = total > EAGER_DECODER_VALUES
    sources: list = decs if lazy else [d.full() for d in decs]
    if enc is None:
        enc = torch.stack(W_enc)
    if check_finite:
        for i in range(L):
            where = folder / f"W_enc_{i}.safetensors"
            _check_finite(W_enc[i], f"{where}: W_enc_{i}")
            _check_finite(b_enc[i], f"{where}: b_enc_{i}")
            _check_finite(b_dec[i], f"{where}: b_dec_{i}")
            if thr:
                _check_finite(thr[i], f"{where}: threshold_{i}")
        for i, s in enumerate(sources):
            if isinstance(s, torch.Tensor):
                _check_finite(s, f"{folder}: W_dec_{i}")
    config.activation = _activation(config, bool(thr), folder)
    config.n_layers, config.d_model, config.n_features = L, D, F
    return CrossLayerTranscoder(
        config, enc, torch.stack(b_enc), torch.stack(b_dec), torch.stack(thr) if thr else None, LazyDecoder(sources)
    )


def _load_plt(folder: Path, config: CLTConfig, check_finite: bool) -> CrossLayerTranscoder:
    layers = _layer_files(folder, r"layer_(\d+)\.safetensors")
    if not layers:
        raise CLTFormatError(f"{folder}: transcoder_set without layer_<i>.safetensors files")
    W_enc, W_dec, b_enc, b_dec, thr = [], [], [], [], []
    for i in layers:
        path = folder / f"layer_{i}.safetensors"
        t = _load_tensors(path)
        for key in ("W_enc", "W_dec", "b_enc", "b_dec"):
            if key not in t:
                raise CLTFormatError(f"{path}: missing tensor {key!r} (found {sorted(t)})")
        W_e = t["W_enc"]
        # Some PLT exports store W_enc as [D, F]; W_dec's [F, D] disambiguates.
        if W_e.shape != t["W_dec"].shape and W_e.shape[::-1] == t["W_dec"].shape:
            W_e = W_e.T.contiguous()
        W_enc.append(W_e)
        W_dec.append(t["W_dec"][:, None, :])
        b_enc.append(t["b_enc"])
        b_dec.append(t["b_dec"])
        th = t.get("activation_function.threshold", t.get("threshold"))
        if th is not None:
            thr.append(th)
    F, D = W_enc[0].shape
    for i in layers:
        _expect(W_enc[i].shape, (F, D), f"layer_{i}.safetensors: W_enc")
        _expect(W_dec[i].shape, (F, 1, D), f"layer_{i}.safetensors: W_dec (as [F, 1, D])")
    enc = torch.stack(W_enc)
    if check_finite:
        for name, ts in (("W_enc", W_enc), ("W_dec", W_dec), ("b_enc", b_enc), ("b_dec", b_dec), ("threshold", thr)):
            for i, t in zip(layers, ts):
                _check_finite(t, f"{folder / f'layer_{i}.safetensors'}: {name}")
    if thr and len(thr) != len(layers):
        raise CLTFormatError(
            f"{folder}: a threshold is stored for {len(thr)} of {len(layers)} layers; expected all or none"
        )
    config.activation = _activation(config, bool(thr), folder)
    config.n_layers, config.d_model, config.n_features = len(layers), D, F
    return CrossLayerTranscoder(
        config,
        enc,
        torch.stack(b_enc),
        torch.stack(b_dec),
        torch.stack(thr) if len(thr) == len(layers) else None,
        LazyDecoder(W_dec),
    )


def _activation(config: CLTConfig, has_threshold: bool, folder: Path) -> Activation:
    """Thresholds stored => JumpReLU (spec); a config.yaml that says otherwise is a contradiction."""
    if has_threshold:
        if config.activation == "topk":
            raise CLTFormatError(
                f"{folder / 'config.yaml'}: activation topk, but the weights store JumpReLU "
                "thresholds; fix the activation in config.yaml (jumprelu) or remove the thresholds"
            )
        return "jumprelu"
    if config.activation == "jumprelu":
        raise CLTFormatError(
            f"{folder / 'config.yaml'}: activation jumprelu, but no threshold tensors are stored; "
            "the download is incomplete, or the activation is relu"
        )
    return config.activation


def _expect(shape: tuple, expected: tuple, what: str) -> None:
    if tuple(shape) != tuple(expected):
        raise CLTFormatError(f"{what} has shape {tuple(shape)}, expected {tuple(expected)} ([F, L-i, D] for W_dec)")


def save_clt(
    folder: str | os.PathLike,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    W_dec: list[torch.Tensor],
    b_dec: torch.Tensor,
    threshold: torch.Tensor | None = None,
    model_name: str | None = None,
    extra_config: dict | None = None,
) -> Path:
    """Write a CLT in circuit-tracer format (atomically: a temp folder renamed into place).

    Args:
        W_enc: ``[L, F, D]``; b_enc: ``[L, F]``; b_dec: ``[L, D]``; threshold: ``[L, F]`` or None.
        W_dec: list of L tensors, the i-th ``[F, L - i, D]``.
    """
    folder = Path(folder)
    L, F, D = W_enc.shape
    if len(W_dec) != L:
        raise CLTFormatError(f"save_clt: got {len(W_dec)} decoder tensors for {L} layers")
    for i, w in enumerate(W_dec):
        _expect(w.shape, (F, L - i, D), f"save_clt: W_dec[{i}]")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    tmp.chmod(0o755)  # mkdtemp makes 0700; a checkpoint folder should be readable like any other
    cfg = {
        "model_kind": "cross_layer_transcoder",
        "feature_input_hook": "hook_resid_mid",
        "feature_output_hook": "hook_mlp_out",
        "model_name": model_name,
        **(extra_config or {}),
    }
    (tmp / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    for i in range(L):
        enc = {f"W_enc_{i}": W_enc[i], f"b_enc_{i}": b_enc[i], f"b_dec_{i}": b_dec[i]}
        if threshold is not None:
            enc[f"threshold_{i}"] = threshold[i]
        save_file({k: v.detach().contiguous().cpu() for k, v in enc.items()}, str(tmp / f"W_enc_{i}.safetensors"))
        save_file({f"W_dec_{i}": W_dec[i].detach().contiguous().cpu()}, str(tmp / f"W_dec_{i}.safetensors"))
    if folder.exists():
        import shutil

        shutil.rmtree(folder)
    tmp.rename(folder)
    return folder


def save_transcoder(clt: CrossLayerTranscoder, folder: str | os.PathLike) -> Path:
    """Write a loaded :class:`CrossLayerTranscoder` back to disk in circuit-tracer format."""
    if not clt.config.is_cross_layer:
        raise CLTFormatError("save_transcoder writes CLTs; PLT sets are read-only in pie_lib")
    W_dec = [clt.decoder_rows(i, torch.arange(clt.n_features)).cpu() for i in range(clt.n_layers)]
    extra = {k: v for k, v in asdict(clt.config).items() if k in ("activation", "k") and v is not None}
    return save_clt(folder, clt.W_enc, clt.b_enc, W_dec, clt.b_dec, clt.threshold, clt.config.model_name, extra)
