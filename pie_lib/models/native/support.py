"""Whether the native backend can run a model folder: the one check ``backend="auto"`` decides by.

It names the first thing it lacks (an architecture without native modules, a RoPE type, an
activation, cross-attention, weights that are not safetensors), so ``backend="native"`` can
refuse in one line and ``backend="auto"`` loads through transformers for exactly those folders.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pie_lib.models.native.common import ACTIVATIONS
from pie_lib.models.native.loading import NATIVE_ARCHS
from pie_lib.models.native.rope import ROPE_TYPES


def native_unsupported(arch: str, config: Any, folder: Path) -> str | None:
    """None when the native backend runs ``folder`` (of ArchSpec ``arch``, config ``config``); else why not."""
    if arch not in NATIVE_ARCHS:
        return f"{arch} has no native implementation (native: {', '.join(sorted(NATIVE_ARCHS))})"
    if not ((folder / "model.safetensors").exists() or (folder / "model.safetensors.index.json").exists()):
        return f"{folder} has no model.safetensors (the native loader reads safetensors only)"
    if arch == "gpt2":
        if getattr(config, "add_cross_attention", False):
            return "GPT-2 with cross-attention"
        act = getattr(config, "activation_function", None)
    else:
        if arch == "gemma2":
            kinds = set(config.layer_types)
            if not kinds <= {"full_attention", "sliding_attention"}:
                return f"Gemma-2 layer types {sorted(kinds)}"
            if "sliding_attention" in kinds and not config.sliding_window:
                return "Gemma-2 sliding layers without a sliding_window"
            if getattr(config, "use_bidirectional_attention", None):
                return "bidirectional Gemma-2 attention"
        params = getattr(config, "rope_parameters", None) or {}
        rope = params.get("rope_type", params.get("type", "default"))
        if rope not in ROPE_TYPES:
            return f"RoPE type {rope!r} (native: {', '.join(ROPE_TYPES)})"
        if float(params.get("partial_rotary_factor", 1.0)) != 1.0:
            return "partial rotary embeddings"
        if int(getattr(config, "pretraining_tp", 1) or 1) != 1:
            return "pretraining_tp > 1"
        act = getattr(config, "hidden_activation" if arch == "gemma2" else "hidden_act", None)
    if act not in (("gelu_pytorch_tanh",) if arch == "gemma2" else ACTIVATIONS):
        return f"activation {act!r} (native: {', '.join(sorted(ACTIVATIONS))})"
    if getattr(config, "_attn_implementation_internal", None) not in (None, "sdpa"):
        return f"attention implementation {config._attn_implementation_internal!r} (native: sdpa)"
    return None
