"""A model's config.json read without transformers' config classes.

transformers' ``LlamaConfig`` module imports ``transformers.activations``, which pulls in its
weight-conversion machinery (``torch.distributed.tensor``, sympy): ~1 s. This reader gives the
attributes pie_lib and the native modules use, with the defaults of transformers 5.24's
``GPT2Config`` / ``LlamaConfig`` and their attribute aliases (``tests/test_native.py`` compares
them against transformers' own, folder by folder). Every other key of config.json is kept as an
attribute, as transformers does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pie_lib.errors import WeightsUnavailableError

#: transformers 5.24's defaults of the attributes the native models read
DEFAULTS: dict[str, dict[str, Any]] = {
    "gpt2": dict(
        vocab_size=50257,
        n_positions=1024,
        n_embd=768,
        n_layer=12,
        n_head=12,
        n_inner=None,
        activation_function="gelu_new",
        resid_pdrop=0.1,
        embd_pdrop=0.1,
        attn_pdrop=0.1,
        layer_norm_epsilon=1e-5,
        scale_attn_weights=True,
        use_cache=True,
        bos_token_id=50256,
        eos_token_id=50256,
        pad_token_id=None,
        scale_attn_by_inverse_layer_idx=False,
        reorder_and_upcast_attn=False,
        add_cross_attention=False,
        tie_word_embeddings=True,
    ),
    "llama": dict(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=None,
        hidden_act="silu",
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        use_cache=True,
        pad_token_id=None,
        bos_token_id=1,
        eos_token_id=2,
        pretraining_tp=1,
        tie_word_embeddings=False,
        rope_parameters=None,
        attention_bias=False,
        attention_dropout=0.0,
        mlp_bias=False,
        head_dim=None,
    ),
    "gemma2": dict(
        vocab_size=256000,
        hidden_size=2304,
        intermediate_size=9216,
        num_hidden_layers=26,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=256,
        hidden_activation="gelu_pytorch_tanh",
        max_position_embeddings=8192,
        rms_norm_eps=1e-6,
        use_cache=True,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
        tie_word_embeddings=True,
        rope_parameters=None,
        attention_bias=False,
        attention_dropout=0.0,
        query_pre_attn_scalar=256,
        sliding_window=4096,
        layer_types=None,
        final_logit_softcapping=30.0,
        attn_logit_softcapping=50.0,
        use_bidirectional_attention=None,
    ),
}
#: transformers' ``attribute_map``s: alias -> attribute
ALIASES: dict[str, dict[str, str]] = {
    "gpt2": {
        "hidden_size": "n_embd",
        "max_position_embeddings": "n_positions",
        "num_attention_heads": "n_head",
        "num_hidden_layers": "n_layer",
    },
    "llama": {},
    "gemma2": {},
}
#: config.json ``model_type`` -> ArchSpec name, for the architectures read here
MODEL_TYPES = {"gpt2": "gpt2", "llama": "llama", "gemma2": "gemma2"}
DEFAULT_ROPE_THETA = 10000.0


class NativeConfig:
    """config.json's values over transformers' defaults; attribute aliases resolved on read."""

    def __init__(self, arch: str, values: dict[str, Any]) -> None:
        self.arch = arch
        self.__dict__.update(DEFAULTS[arch])
        aliases = ALIASES[arch]
        for key, value in values.items():
            setattr(self, aliases.get(key, key), value)
        if arch == "llama":
            if self.head_dim is None:
                self.head_dim = self.hidden_size // self.num_attention_heads
            if self.num_key_value_heads is None:
                self.num_key_value_heads = self.num_attention_heads
            self.rope_parameters = _standard_rope(values, self.max_position_embeddings)
        if arch == "gemma2":
            if self.layer_types is None:
                self.layer_types = [
                    "sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(self.num_hidden_layers)
                ]
            self.rope_parameters = _standard_rope(values, self.max_position_embeddings)

    def __getattr__(self, name: str) -> Any:  # only called for names not set: the aliases
        aliases = ALIASES.get(self.__dict__.get("arch", ""), {})
        if name in aliases:
            return getattr(self, aliases[name])
        raise AttributeError(name)

    def __repr__(self) -> str:
        return f"NativeConfig({self.arch}, {self.__dict__})"


def _standard_rope(values: dict[str, Any], max_positions: int) -> dict[str, Any]:
    """transformers' ``standardize_rope_params``: one dict with rope_type and rope_theta (a
    ``rope_scaling`` and a top-level ``rope_theta`` of older config.json files moved in)."""
    params = dict(values.get("rope_parameters") or values.get("rope_scaling") or {})
    params.setdefault("rope_theta", values.get("rope_theta", DEFAULT_ROPE_THETA))
    if "partial_rotary_factor" in values:
        params.setdefault("partial_rotary_factor", values["partial_rotary_factor"])
    params.setdefault("rope_type", params.get("type", "default"))
    if params["rope_type"] in ("llama3", "yarn", "longrope"):
        if "original_max_position_embeddings" in values:
            params["original_max_position_embeddings"] = values["original_max_position_embeddings"]
        else:
            params.setdefault("original_max_position_embeddings", max_positions)
    return params


def read_config_json(folder: str | Path) -> dict[str, Any] | None:
    """config.json of ``folder`` as a dict; None when missing or unreadable (the caller's loader then reports it)."""
    path = Path(folder) / "config.json"
    try:
        values = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return values if isinstance(values, dict) else None


def native_config(values: dict[str, Any]) -> NativeConfig | None:
    """The :class:`NativeConfig` of a config.json dict whose model_type has native modules, else None."""
    arch = MODEL_TYPES.get(str(values.get("model_type")))
    if arch is None:
        return None
    try:
        return NativeConfig(arch, values)
    except (TypeError, ZeroDivisionError) as exc:
        raise WeightsUnavailableError(f"config.json of a {arch} model has invalid values ({exc})") from None
