"""Build a native model from a config and read a local folder's safetensors into it.

The weights are read with plain file reads into tensors the process owns (no file mapping stays
behind, which is what ``models/loading.py:_own_memory`` achieves for transformers loads), each
tensor in its own storage (a later in-place dtype change frees the old one tensor by tensor).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pie_lib.errors import SettingError, WeightsUnavailableError
from pie_lib.models.native.common import NativeCausalLM

#: ArchSpec name -> the native class's module and name (imported on demand)
NATIVE_ARCHS: dict[str, tuple[str, str]] = {
    "gpt2": ("pie_lib.models.native.gpt2", "NativeGPT2LMHeadModel"),
    "llama": ("pie_lib.models.native.llama", "NativeLlamaForCausalLM"),
    "gemma2": ("pie_lib.models.native.gemma2", "NativeGemma2ForCausalLM"),
}

#: the base model's attribute per arch (checkpoints saved from the base model lack this prefix)
_PREFIX = {"gpt2": "transformer.", "llama": "model.", "gemma2": "model."}
#: keys some GPT-2 checkpoints carry that are constants, not weights (the old causal-mask buffers)
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def build_native(arch: str, config: Any) -> NativeCausalLM:
    """An uninitialised native model of ``arch`` on the meta device (no memory)."""
    import importlib

    if arch not in NATIVE_ARCHS:
        raise SettingError(
            f"there is no native {arch} model (native: {', '.join(sorted(NATIVE_ARCHS))}); use --model-backend hf"
        )
    module, cls = NATIVE_ARCHS[arch]
    with torch.device("meta"):
        return getattr(importlib.import_module(module), cls)(config)


def safetensors_files(folder: Path) -> list[Path]:
    """The folder's weight files: ``model.safetensors``, or the shards its index lists."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / n for n in names]
    single = folder / "model.safetensors"
    if single.exists():
        return [single]
    raise WeightsUnavailableError(
        f"model folder {str(folder)!r} has no model.safetensors (or index); the native backend reads safetensors "
        "only: convert the weights, or pass --model-backend hf"
    )


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of one safetensors file, read (not mapped) into CPU tensors of their own."""
    out: dict[str, torch.Tensor] = {}
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        base = 8 + n
        for name, info in sorted(
            header.items(), key=lambda kv: kv[1]["data_offsets"][0] if kv[0] != "__metadata__" else -1
        ):
            if name == "__metadata__":
                continue
            if info["dtype"] not in _DTYPES:
                raise WeightsUnavailableError(
                    f"model file {path}: tensor {name} has dtype {info['dtype']}, which the native loader cannot "
                    "read; use --model-backend hf"
                )
            lo, hi = info["data_offsets"]
            raw = torch.empty(hi - lo, dtype=torch.uint8)
            f.seek(base + lo)
            if hi > lo and f.readinto(raw.numpy().data) != hi - lo:
                raise WeightsUnavailableError(
                    f"model file {path} is truncated (tensor {name}); re-download the weights"
                )
            out[name] = raw.view(_DTYPES[info["dtype"]]).reshape(info["shape"])
    return out


def load_native_model(
    folder: str | Path, arch: str, config: Any, device: torch.device, dtype: torch.dtype
) -> NativeCausalLM:
    """The native model of ``arch`` with ``folder``'s weights in ``dtype`` on ``device``, frozen and in eval mode.

    Tied embeddings (``config.tie_word_embeddings``): the head shares the input embedding's
    parameter, as in transformers. Missing or unexpected weights are refused.
    """
    folder = Path(folder)
    model = build_native(arch, config)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    head_key = "lm_head.weight"
    emb_key = {"gpt2": "transformer.wte.weight"}.get(arch, "model.embed_tokens.weight")
    expected = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    if tied:
        expected.discard(head_key)
    prefix = _PREFIX[arch]
    loaded: dict[str, torch.Tensor] = {}
    for path in safetensors_files(folder):
        for key, t in read_safetensors(path).items():
            if key.endswith(_IGNORED_SUFFIXES):
                continue
            if key not in expected and key != head_key and prefix + key in expected:
                key = prefix + key  # saved from the base model
            if tied and key == head_key:
                continue  # the head is the embedding
            loaded[key] = t
    missing = sorted(expected - set(loaded))
    unexpected = sorted(set(loaded) - expected)
    if missing or unexpected:
        what = []
        if missing:
            what.append(f"missing {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
        if unexpected:
            what.append(f"unexpected {', '.join(unexpected[:3])}{' ...' if len(unexpected) > 3 else ''}")
        raise WeightsUnavailableError(
            f"model folder {str(folder)!r}: the weights do not fit the native {arch} model ({'; '.join(what)}); "
            "check the folder, or pass --model-backend hf"
        )
    modules = dict(model.named_modules())
    for key, t in loaded.items():
        owner, _, leaf = key.rpartition(".")
        mod = modules[owner]
        want = tuple(getattr(mod, leaf).shape)
        if tuple(t.shape) != want:
            raise WeightsUnavailableError(
                f"model folder {str(folder)!r}: weight {key} has shape {tuple(t.shape)}, the config says {want}; "
                "the config.json and the weights disagree"
            )
        if t.is_floating_point() and t.dtype != dtype:
            t = t.to(dtype)
        setattr(mod, leaf, nn.Parameter(t.to(device), requires_grad=False))
    if tied:
        model.lm_head.weight = modules[emb_key.rpartition(".")[0]].weight  # pyright: ignore[reportAttributeAccessIssue]
    model.init_buffers(device, dtype)
    return model.eval()
