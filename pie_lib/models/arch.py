"""One typed table says where every hook lives, per architecture. Nothing else branches on it.

For each supported Hugging Face class we record (module paths relative to a decoder layer):

- where the CLT **reads**: the *input* of ``resid_mid`` (the pre-MLP norm),
- where the CLT **writes**: the *output* of ``mlp_out`` (Gemma-2: after its post-MLP norm),
- what to freeze for the **replacement gradient** (spec §2.5): the norm modules whose scales
  are frozen, and the attention projections whose outputs feed the pattern (Q and K) and are
  detached so no gradient flows through the softmax,
- the MLP's shape for CLT-RelP's LRP rules (gated or plain, and the projection names).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pie_lib.errors import UnknownArchitectureError

NormKind = Literal["rms", "rms_offset", "layernorm"]


@dataclass(frozen=True)
class PatternInput:
    """A module whose output feeds the attention pattern.

    ``fraction`` is the leading share of the output's last dimension that is Q/K (GPT-2's fused
    ``c_attn`` emits [q | k | v], so its first 2/3 are pattern inputs; Llama's q_proj is all Q).
    """

    path: str
    fraction: tuple[int, int] = (1, 1)


@dataclass(frozen=True)
class ArchSpec:
    """Where pie_lib hooks into one model family. Paths are dotted attribute paths."""

    name: str
    hf_classes: tuple[str, ...]
    layers: str  # from the model root to the ModuleList of decoder layers
    final_norm: str  # from the model root
    resid_mid: str  # per layer: the module whose INPUT is hook_resid_mid
    mlp_out: str  # per layer: the module whose OUTPUT is hook_mlp_out
    mlp: str  # per layer: the MLP module (CLT-RelP rewrites its backward)
    mlp_kind: Literal["gated", "plain"]
    mlp_in: tuple[str, ...]  # gated: (gate, up); plain: (fc,)
    mlp_down: str
    mlp_act: str  # the activation-function module inside the MLP
    norms: tuple[str, ...]  # per layer: norm modules whose scale is frozen
    norm_kind: NormKind
    pattern_inputs: tuple[PatternInput, ...]
    layer_order: tuple[str, ...] = ()  # every module above, in forward order (nnsight needs it)
    logit_softcap_attr: str | None = None  # config attribute of a final logit soft-cap
    supports_logits_to_keep: bool = True  # HF forward accepts logits_to_keep (last-position logits only)
    native: bool = False  # pie_lib.models.native has its own modules for it (else it always loads through transformers)


ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": ArchSpec(
        name="llama",
        hf_classes=("LlamaForCausalLM",),
        layers="model.layers",
        final_norm="model.norm",
        resid_mid="post_attention_layernorm",
        mlp_out="mlp",
        mlp="mlp",
        mlp_kind="gated",
        mlp_in=("gate_proj", "up_proj"),
        mlp_down="down_proj",
        mlp_act="act_fn",
        norms=("input_layernorm", "post_attention_layernorm"),
        norm_kind="rms",
        pattern_inputs=(PatternInput("self_attn.q_proj"), PatternInput("self_attn.k_proj")),
        layer_order=("input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "post_attention_layernorm", "mlp"),
        native=True,
    ),
    "gemma2": ArchSpec(
        name="gemma2",
        hf_classes=("Gemma2ForCausalLM",),
        layers="model.layers",
        final_norm="model.norm",
        resid_mid="pre_feedforward_layernorm",
        mlp_out="post_feedforward_layernorm",
        mlp="mlp",
        mlp_kind="gated",
        mlp_in=("gate_proj", "up_proj"),
        mlp_down="down_proj",
        mlp_act="act_fn",
        norms=(
            "input_layernorm",
            "post_attention_layernorm",
            "pre_feedforward_layernorm",
            "post_feedforward_layernorm",
        ),
        norm_kind="rms_offset",
        pattern_inputs=(PatternInput("self_attn.q_proj"), PatternInput("self_attn.k_proj")),
        layer_order=(
            "input_layernorm",
            "self_attn.q_proj",
            "self_attn.k_proj",
            "post_attention_layernorm",
            "pre_feedforward_layernorm",
            "mlp",
            "post_feedforward_layernorm",
        ),
        logit_softcap_attr="final_logit_softcapping",
        native=True,
    ),
    "gpt2": ArchSpec(
        name="gpt2",
        hf_classes=("GPT2LMHeadModel",),
        layers="transformer.h",
        final_norm="transformer.ln_f",
        resid_mid="ln_2",
        mlp_out="mlp",
        mlp="mlp",
        mlp_kind="plain",
        mlp_in=("c_fc",),
        mlp_down="c_proj",
        mlp_act="act",
        norms=("ln_1", "ln_2"),
        norm_kind="layernorm",
        pattern_inputs=(PatternInput("attn.c_attn", (2, 3)),),
        layer_order=("ln_1", "attn.c_attn", "ln_2", "mlp"),
        native=True,
    ),
}


def arch_for(model_or_class: object) -> ArchSpec:
    """The spec for a model instance, a class, or a class name; clear error when unknown."""
    native = getattr(model_or_class, "pie_arch", None)  # a pie_lib.models.native class or instance
    if isinstance(native, str) and native in ARCHITECTURES:
        return ARCHITECTURES[native]
    if isinstance(model_or_class, str):
        cls_name = model_or_class
    elif isinstance(model_or_class, type):
        cls_name = model_or_class.__name__
    else:
        cls_name = type(model_or_class).__name__
    for spec in ARCHITECTURES.values():
        if cls_name in spec.hf_classes or cls_name == spec.name:
            return spec
    supported = ", ".join(c for s in ARCHITECTURES.values() for c in s.hf_classes)
    raise UnknownArchitectureError(
        f"architecture {cls_name!r} is not supported; pie_lib knows {supported}. "
        "Add an ArchSpec to pie_lib.models.arch.ARCHITECTURES to support it"
    )


def get_path(root: Any, path: str) -> Any:
    """Follow a dotted path (``model.layers``) from ``root``; works on modules and nnsight envoys."""
    obj = root
    for part in path.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj
