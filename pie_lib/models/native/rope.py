"""Rotary position embeddings as transformers 5.24 computes them: the ``default`` and the Llama-3
(``llama3``) inverse frequencies, and the cos/sin tables of the positions in a forward."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from pie_lib.errors import SettingError

ROPE_TYPES = ("default", "llama3")


def rope_parameters(config: Any) -> dict:
    """The config's standardised ``rope_parameters`` (transformers' config classes move a
    ``rope_scaling`` / ``rope_theta`` of config.json there)."""
    params = getattr(config, "rope_parameters", None)
    if not isinstance(params, dict) or "rope_theta" not in params:
        raise SettingError("the model config has no rope_parameters with rope_theta; load it with --model-backend hf")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise SettingError(
            f"the native backend has no RoPE type {rope_type!r} (it has {', '.join(ROPE_TYPES)}); "
            "load this model with --model-backend hf"
        )
    if float(params.get("partial_rotary_factor", 1.0)) != 1.0:
        raise SettingError(
            "the native backend has no partial rotary embeddings; load this model with --model-backend hf"
        )
    return {**params, "rope_type": rope_type}


def inverse_frequencies(config: Any, head_dim: int, device: torch.device | str | None = None) -> Tensor:
    """``[head_dim / 2]`` float32 inverse frequencies; llama3 rescales the low and medium ones."""
    params = rope_parameters(config)
    base = params["rope_theta"]
    inv_freq = 1.0 / (
        base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / head_dim)
    )
    if params["rope_type"] == "default":
        return inv_freq
    factor = params["factor"]
    low, high = params["low_freq_factor"], params["high_freq_factor"]
    old_len = params["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)  # long wavelengths: divided
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled  # in between: interpolated
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """cos and sin ``[1, T, head_dim]`` of ``position_ids`` ``[1, T]``, in the activations' dtype."""

    def __init__(self, config: Any, head_dim: int) -> None:
        super().__init__()
        self.config, self.head_dim = config, head_dim
        rope_parameters(config)  # refuse unsupported types at build time
        self.attention_scaling = 1.0  # default and llama3 leave cos/sin unscaled
        self.register_buffer("inv_freq", torch.empty(head_dim // 2), persistent=False)

    def reset(self, device: torch.device | str) -> None:
        self.inv_freq = inverse_frequencies(self.config, self.head_dim, device)

    def forward(self, x: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """q ``[B, H, T, d]``, k ``[B, H_kv, T, d]`` rotated by cos/sin ``[1, T, d]``."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)
