"""Load a Hugging Face causal LM into nnsight, from a local folder or a hub id."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from pie_lib.errors import SettingError, ShapeMismatchError, WeightsUnavailableError
from pie_lib.models.activations import use_blocked_activations
from pie_lib.models.arch import ArchSpec, arch_for, get_path
from pie_lib.models.host_memory import settle_for_model
from pie_lib.models.tokenizer import load_tokenizer

if TYPE_CHECKING:
    from pie_lib.clt.transcoder import CrossLayerTranscoder

Remote = bool | str  # False, True (NDIF), or "local" (nnsight's local simulation of remote)
Backend = Literal["auto", "native", "hf"]
BACKENDS: tuple[str, ...] = ("auto", "native", "hf")


@dataclass
class LoadedModel:
    """An nnsight-wrapped model with its architecture spec and run settings.

    Attributes:
        lm: the ``nnsight.LanguageModel``.
        arch: where the hooks live.
        tokenizer: the model's tokenizer (BOS is prepended by it).
        name: the folder or hub id it came from.
        remote: passed as ``remote=`` to every trace pie_lib runs.
        backend: "native" (pie_lib's own modules, :mod:`pie_lib.models.native`, wrapped in
            ``nnsight.NNsight``) or "hf" (a ``transformers`` model in nnsight's ``LanguageModel``).
    """

    lm: Any
    arch: ArchSpec
    tokenizer: Any
    name: str
    remote: Remote = False
    extra: dict = field(default_factory=dict)
    backend: Literal["native", "hf"] = "hf"

    def kv_cache(self, kv: list[tuple[torch.Tensor, torch.Tensor]], filled: int | None = None) -> Any:
        """A key-value cache this model's forward accepts, holding ``kv`` (per layer ``[B, H_kv, P, d]``
        keys and values): the native ``KVCache``, or transformers' ``DynamicCache``.

        ``filled`` (native only): layers longer than this are preallocated buffers holding positions
        ``0..filled-1``, which the forward fills in place from there (``KVCache``)."""
        if self.backend == "native":
            from pie_lib.models.native.common import KVCache

            return KVCache(kv, filled)
        if filled is not None:
            raise ValueError("preallocated key-value buffers are native-only; pass the cached positions alone")
        from transformers import DynamicCache

        return DynamicCache(ddp_cache_data=kv, config=self.config)

    @property
    def pads_short_query_blocks(self) -> bool:
        """Whether every attention of this model pads a cached suffix's 1-3-row tail query block
        (native GPT-2, native Llama without grouped queries), so its suffixes round as whole-prompt
        forwards from any start (:func:`pie_lib.engine.traces.exact_suffix_start`)."""
        return self.backend == "native" and bool(getattr(self.hf, "pads_short_query_blocks", False))

    def require_generate(self, what: str) -> None:
        """Refuse, in one line, ``what`` (a caller of nnsight's ``generate``) on the native backend."""
        if self.backend == "native":
            raise SettingError(
                f"{what} generates text, which the native model backend does not do; load the model with "
                "backend='hf' (--model-backend hf)"
            )

    @property
    def hf(self) -> torch.nn.Module:
        """The underlying ``transformers`` module (local runs only)."""
        return self.lm._module

    @property
    def config(self) -> Any:
        return self.lm.config if hasattr(self.lm, "config") else self.hf.config

    @property
    def n_layers(self) -> int:
        return int(self.config.num_hidden_layers if hasattr(self.config, "num_hidden_layers") else self.config.n_layer)

    @property
    def d_model(self) -> int:
        return int(self.config.hidden_size if hasattr(self.config, "hidden_size") else self.config.n_embd)

    @property
    def vocab_size(self) -> int:
        return int(self.config.vocab_size)

    @property
    def device(self) -> torch.device:
        """Where this process keeps tensors for the model: its parameters' device; the CPU when
        remote (the local skeleton is on meta, and a tensor moved there loses its values)."""
        if self.remote is True:
            return torch.device("cpu")
        try:
            return next(self.hf.parameters()).device
        except StopIteration:
            return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        try:
            return next(self.hf.parameters()).dtype
        except StopIteration:
            return torch.float32

    def layer(self, i: int) -> Any:
        """The nnsight envoy of decoder layer ``i``."""
        return get_path(self.lm, self.arch.layers)[i]

    def envoy(self, layer: int, rel_path: str) -> Any:
        return get_path(self.layer(layer), rel_path)

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, always starting with BOS.

        Llama/Gemma tokenizers add BOS themselves; GPT-2's does not, and TransformerLens (which the
        reference implementation runs on) prepends ``<|endoftext|>`` -- so do we, so that position 0
        is a BOS everywhere and its activations are the ones excluded. A tokenizer without a BOS
        token is refused: position 0 would be a real prompt token, silently excluded.
        """
        bos = getattr(self.tokenizer, "bos_token_id", None)
        if bos is None:
            raise SettingError(
                f"the tokenizer of model {self.name} has no BOS token, so position 0 (which PIE excludes) would be "
                "a real prompt token; set bos_token in its tokenizer_config.json (GPT-2 style models use their "
                "<|endoftext|> token, as TransformerLens does)"
            )
        out = []
        for t in texts:
            ids = list(self.tokenizer(t)["input_ids"])
            if not ids or ids[0] != bos:
                ids = [bos] + ids
            out.append(ids)
        return out

    def target_ids(self, text: str) -> list[int]:
        """All tokens of a target string (no special tokens)."""
        return [int(t) for t in self.tokenizer(text, add_special_tokens=False)["input_ids"]]

    def target_token(self, text: str) -> int:
        """A target string's token: the LAST token of its tokenisation (spec §1)."""
        ids = self.target_ids(text)
        if not ids:
            raise ShapeMismatchError(f"target {text!r} tokenises to nothing")
        return ids[-1]

    def check_clt(self, clt: CrossLayerTranscoder) -> None:
        """Raise a clear error when the CLT does not fit this model."""
        if clt.d_model != self.d_model:
            raise ShapeMismatchError(
                f"CLT d_model {clt.d_model} != model d_model {self.d_model} ({self.name}); "
                "load the CLT trained for this model"
            )
        if clt.n_layers != self.n_layers:
            raise ShapeMismatchError(
                f"CLT has {clt.n_layers} layers but model {self.name} has {self.n_layers}; "
                "load the CLT trained for this model"
            )


def _nnsight_class():
    """nnsight >= 0.8 names it TransformersModel (LanguageModel is deprecated there)."""
    try:
        from nnsight.modeling.transformers import TransformersModel

        return lambda *a, **kw: TransformersModel(*a, task="text-generation", **kw)
    except ImportError:  # pragma: no cover - older nnsight
        from nnsight import LanguageModel

        return LanguageModel


def _first_line(exc: BaseException, limit: int = 200) -> str:
    """``Type: first line of the message`` (cut), for one-line error messages."""
    msg = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {msg[0][:limit]}" if msg else type(exc).__name__


def check_device(device: str | torch.device) -> torch.device:
    """Parse ``device`` and make sure it exists here; a clear :class:`SettingError` otherwise."""
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise SettingError(f"--device {str(device)!r} is not a device; use cpu, cuda or cuda:<index>") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SettingError(f"--device {str(device)!r}: CUDA is not available on this machine; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise SettingError(
                f"--device {str(device)!r}: no such GPU (this machine has {torch.cuda.device_count()}); "
                "use cuda:0 ... or cpu"
            )
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise SettingError(f"--device {str(device)!r}: MPS is not available on this machine; use --device cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise SettingError(f"--device {str(device)!r} is not supported; use cpu, cuda or cuda:<index>")
    return dev


def check_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """``"bfloat16"`` -> ``torch.bfloat16``; a clear :class:`SettingError` for anything not a float dtype."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise SettingError(
            f"--dtype {str(dtype)!r} is not a floating-point torch dtype; use float32, bfloat16 or float16"
        )
    return value


def check_model_source(name: str) -> None:
    """Refuse, without loading anything, a model name that is a file or neither a folder nor a hub id."""
    local = Path(name).expanduser()
    if local.exists() and not local.is_dir():
        raise WeightsUnavailableError(
            f"model {name!r} is a file; pass the folder that holds config.json, weights and tokenizer"
        )
    if not local.exists() and (name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name):
        raise WeightsUnavailableError(
            f"model {name!r}: no such local folder, and not a Hugging Face repo id (owner/name)"
        )


def load_model(
    name_or_path: str | os.PathLike,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    remote: Remote = False,
    backend: Backend | str = "auto",
) -> LoadedModel:
    """Load a causal LM into nnsight.

    Args:
        name_or_path: a local folder (config + weights + tokenizer) or a hub id.
        device: "cpu", "cuda", "cuda:1"...; default cuda when available, else cpu.
        dtype: torch dtype or its name ("float32", "bfloat16"); default float32 on CPU, bfloat16 on GPU.
        remote: False to run here; True to run every trace on NDIF (needs ``nnsight.CONFIG``'s API
            key); "local" for nnsight's local simulation of remote execution.
        backend: "native" builds pie_lib's own modules (:mod:`pie_lib.models.native`; no
            transformers modeling code is imported) from a local folder's config.json and
            safetensors; "hf" loads through transformers; "auto" (default) is native for a local
            folder of an architecture with a native implementation (GPT-2, Llama, Gemma-2) whose
            config it supports, run locally (``remote is False``), and hf otherwise.
    Returns:
        A :class:`LoadedModel`. Unknown architectures raise ``UnknownArchitectureError``.
    """
    name = str(name_or_path)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if remote is not True:  # remote runs keep only a meta skeleton here
        device = check_device(device)
    dtype = check_dtype(dtype)
    if dtype is None:
        dtype = torch.float32 if str(device).startswith("cpu") else torch.bfloat16
    if backend not in BACKENDS:
        raise SettingError(f"model backend {backend!r}: use one of {', '.join(BACKENDS)}")
    if backend == "native" and remote is not False:
        raise SettingError(
            "--model-backend native runs the model here, but --remote runs it on NDIF (through transformers); "
            "drop one of them"
        )
    check_model_source(name)
    local = Path(name).expanduser()
    if backend == "native" and not local.is_dir():
        raise SettingError(
            f"--model-backend native reads a local model folder, and {name!r} is not one; download it and pass "
            "the folder, or use --model-backend hf"
        )
    if backend != "hf" and local.is_dir() and remote is False:
        native = _native_choice(local, backend)
        if native is not None:
            return _settle_host_memory(_load_native(name, local, native[0], native[1], check_device(device), dtype))
    from transformers import AutoConfig

    LanguageModel = _nnsight_class()
    try:
        cfg = AutoConfig.from_pretrained(name)
    except Exception as exc:
        if local.is_dir():
            raise WeightsUnavailableError(
                f"model folder {name!r}: config.json could not be read ({_first_line(exc)}); "
                "the folder needs a valid config.json, weights (*.safetensors) and tokenizer files"
            ) from None
        from pie_lib.provenance import hub_unreachable

        raise WeightsUnavailableError(hub_unreachable("model", name, exc)) from None
    arch = arch_for((cfg.architectures or [type(cfg).__name__])[0])
    if remote is True:
        # NDIF holds the weights: load only the meta skeleton here. The tokenizer is passed in:
        # nnsight 0.8.1 infers it from transformers' pipeline task table, whose "impl" became a
        # string in transformers 5.23, so without it the meta build fails ("Impossible to guess
        # which tokenizer to use").
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(name)
            lm = LanguageModel(name, tokenizer=tokenizer)
        except Exception as exc:
            raise WeightsUnavailableError(
                f"model {name!r}: the remote model skeleton could not be built ({_first_line(exc)}); the folder or "
                "hub repo needs config.json and tokenizer files"
            ) from None
    else:
        try:
            lm = (
                _load_local(name, device, dtype)
                if local.is_dir() and remote is False  # "local" remote simulation keeps nnsight's loader
                else LanguageModel(name, device_map=str(device), dispatch=True, dtype=dtype)
            )
        except Exception as exc:  # missing/truncated weights, missing tokenizer, bad config values
            if isinstance(exc, MemoryError) or "out of memory" in str(exc).lower():
                raise SettingError(
                    f"model {name!r} does not fit in memory on {device} ({_first_line(exc)}); use a device with more "
                    "memory, --dtype bfloat16, or --remote"
                ) from None
            raise WeightsUnavailableError(
                f"model {name!r}: weights or tokenizer could not be loaded ({_first_line(exc)}); the folder needs "
                "config.json, complete weights (*.safetensors) and tokenizer files -- re-download them where "
                "there is network and pass the local folder"
            ) from None
        freeze_weights(lm)
        if torch.device(device).type == "cpu":  # a hub download is file-mapped just like a folder
            _own_memory(lm._module)
    return _settle_host_memory(LoadedModel(lm=lm, arch=arch, tokenizer=lm.tokenizer, name=name, remote=remote))


def _settle_host_memory(model: LoadedModel) -> LoadedModel:
    """Pin glibc's mmap threshold for a large CPU model (:mod:`pie_lib.models.host_memory`); the
    outcome is recorded as ``model.extra["mmap_threshold_pinned"]``."""
    if model.remote is True:
        return model
    weight_bytes = sum(p.numel() * p.element_size() for p in model.hf.parameters())
    model.extra["mmap_threshold_pinned"] = settle_for_model(weight_bytes, model.device.type)
    return model


def _native_choice(folder: Path, backend: str) -> tuple[ArchSpec, Any] | None:
    """(arch, config) when ``folder`` loads natively, None when it loads through transformers
    (backend "auto" and something the native backend lacks); "native" refuses instead."""
    from pie_lib.models.native.config import native_config, read_config_json
    from pie_lib.models.native.support import native_unsupported

    values = read_config_json(folder)
    if values is None:  # the transformers path reports the broken config.json
        return None
    cfg = native_config(values)
    archs = values.get("architectures") or [str(values.get("model_type"))]
    arch = arch_for(archs[0])
    if cfg is None or cfg.arch != arch.name:
        reason = f"{arch.name} has no native implementation (native: gpt2, llama, gemma2)"
    else:
        reason = native_unsupported(arch.name, cfg, folder)
    if reason is None:
        return arch, cfg
    if backend == "native":
        raise SettingError(f"--model-backend native: {reason}; use --model-backend hf (or auto)")
    return None


def _load_native(
    name: str, folder: Path, arch: ArchSpec, cfg: Any, device: torch.device, dtype: torch.dtype
) -> LoadedModel:
    """A local folder loaded into pie_lib's own modules (read into process memory, frozen), wrapped in
    ``nnsight.NNsight``; the tokenizer with the settings :func:`_load_local` gives it."""
    from nnsight import NNsight

    from pie_lib.models.native.loading import load_native_model

    try:
        module = load_native_model(folder, arch.name, cfg, device, dtype)
        tok = load_tokenizer(str(folder), config=cfg)  # passed: AutoTokenizer would otherwise load AutoConfig's class
    except WeightsUnavailableError:
        raise
    except SettingError as exc:  # the modules refuse the config's values (heads not dividing the width, ...)
        raise WeightsUnavailableError(
            f"model {name!r}: its config.json has values no model can be built from ({exc}); fix the folder's "
            "config.json"
        ) from None
    except Exception as exc:
        if isinstance(exc, MemoryError) or "out of memory" in str(exc).lower():
            raise SettingError(
                f"model {name!r} does not fit in memory on {device} ({_first_line(exc)}); use a device with more "
                "memory or --dtype bfloat16"
            ) from None
        raise WeightsUnavailableError(
            f"model {name!r}: weights or tokenizer could not be loaded ({_first_line(exc)}); the folder needs "
            "config.json, complete weights (*.safetensors) and tokenizer files"
        ) from None
    lm = NNsight(module)
    freeze_weights(lm)
    return LoadedModel(lm=lm, arch=arch, tokenizer=tok, name=name, remote=False, backend="native")


def _load_local(folder: str, device: torch.device | str, dtype: torch.dtype) -> Any:
    """A local folder's weights loaded once, straight onto ``device``, then wrapped in nnsight.

    nnsight's own loading of a repo id first builds a meta-device copy (to trace without weights)
    and then loads the real weights -- two model constructions. With the folder on disk the real
    model is all we need. The tokenizer gets nnsight's settings (EOS as pad when there is no pad
    token, left padding for causal LMs), so both paths hand back the same object.
    """
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, device_map=str(device))
    tok = load_tokenizer(folder)
    use_blocked_activations(hf)  # before nnsight wraps it (it keeps an instance forward as the body)
    return _nnsight_class()(hf.eval(), tokenizer=tok)


def _own_memory(hf: torch.nn.Module) -> None:
    """Copy CPU weights out of the safetensors memory map into the process's own memory.

    A CPU load leaves every weight a view of the mapped file. Any in-place dtype change (Synergy's
    float32 forwards upcast the model for their duration) then holds the mapped pages and the new
    copy at once: +2.5 GB of peak RSS at Llama-3.2-1B's shape in bf16, measured. Copied, the old
    storage is freed as each tensor is replaced. Costs one read of the weights at load.
    """
    with torch.no_grad():
        for t in (*hf.parameters(), *hf.buffers()):
            t.data = t.data.clone()


def wrap_model(
    hf_model: torch.nn.Module, tokenizer: Any, name: str = "in-memory", remote: Remote = False
) -> LoadedModel:
    """Wrap an already-built ``transformers`` model (tests, notebooks building tiny models), or a
    :mod:`pie_lib.models.native` one (``nnsight.NNsight``, backend "native")."""
    arch = arch_for(hf_model)
    if isinstance(getattr(hf_model, "pie_arch", None), str):
        from nnsight import NNsight

        if remote is not False:
            raise SettingError("a native model runs here only; wrap a transformers model for remote runs")
        native = NNsight(hf_model.eval())
        freeze_weights(native)
        return LoadedModel(lm=native, arch=arch, tokenizer=tokenizer, name=name, remote=False, backend="native")
    LanguageModel = _nnsight_class()
    use_blocked_activations(hf_model)
    lm = LanguageModel(hf_model.eval(), tokenizer=tokenizer)
    freeze_weights(lm)
    return LoadedModel(lm=lm, arch=arch, tokenizer=tokenizer, name=name, remote=remote)


def freeze_weights(lm: Any) -> None:
    """Eval mode, no weight takes a gradient, and the unembedding reads a contiguous input.

    pie_lib differentiates only with respect to activations (MLP outputs, embeddings, masks), never
    weights. Left trainable, every backward also builds a weight gradient it never reads: 2.5 GB
    at Llama-3.2-1B's shape in bf16, the peak of a prune run. Frozen, the backward stops at the
    activation leaves; the remote path already works this way (a server's weights are frozen).

    Frozen weights need the unembedding hook below: with ``logits_to_keep=1`` transformers hands the
    unembedding a strided ``[B, 1, D]`` slice, and for that input and a weight that does not require
    grad, torch 2.13's CPU matmul expands the weight per batch row instead of folding it into one
    mm (measured: 10.9 s against 20 ms for a 32,000 x 2,048 bf16 head and B = 16).
    """
    lm.eval()
    for p in lm.parameters():
        p.requires_grad_(False)
    hf = getattr(lm, "_module", lm)  # the transformers module inside the nnsight wrapper
    head = hf.get_output_embeddings() if hasattr(hf, "get_output_embeddings") else None
    if isinstance(head, torch.nn.Module) and _contiguous_inputs not in head._forward_pre_hooks.values():
        head.register_forward_pre_hook(_contiguous_inputs)


def _contiguous_inputs(_module: torch.nn.Module, args: tuple) -> tuple:
    return tuple(_row_major(a) if isinstance(a, torch.Tensor) else a for a in args)


def _row_major(a: torch.Tensor) -> torch.Tensor:
    """``a`` with row-major strides. ``.contiguous()`` is not enough: a ``[1, 1, D]`` last-position
    slice counts as contiguous (strides of size-1 dims are ignored) and is returned as it is, and
    the matmul then still expands the weight (measured at Gemma-2-2B's shape in bf16: a 1.1 GiB
    copy of the unembedding and ~4 s per batch-of-one forward; bitwise the same logits)."""
    want, step = [], 1
    for size in reversed(a.shape):
        want.append(step)
        step *= size
    if a.is_contiguous() and tuple(reversed(want)) == a.stride():
        return a
    return a.clone(memory_format=torch.contiguous_format)
