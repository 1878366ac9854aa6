"""Gemma-2 (``Gemma2ForCausalLM``'s module tree and parameter names), forward as transformers 5.24's
with its eager attention (transformers has no SDPA path for Gemma-2: SDPA cannot soft-cap logits):
four (1 + w) RMSNorms per layer, sqrt(D)-scaled embeddings, alternating sliding-window and full
attention, attention and final logit soft-caps, ``gelu_pytorch_tanh``. Shapes: B batch, T new
positions, S keys, D width, H query heads, H_kv key-value heads, d head size."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from pie_lib.errors import SettingError
from pie_lib.models.native.common import (
    Embedding,
    KVCache,
    Linear,
    NativeCausalLM,
    check_final_rows,
    embed_inputs,
    repeat_kv,
)
from pie_lib.models.native.rope import RotaryEmbedding, apply_rotary


class Gemma2RMSNorm(nn.Module):
    """Normalise in float32, scale by ``1 + weight`` in float32, cast back."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(size))

    def forward(self, x: Tensor) -> Tensor:
        h = x.float()
        out = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (out * (1.0 + self.weight.float())).type_as(x)


class GELUTanh(nn.Module):
    """``gelu_pytorch_tanh``: torch's tanh-approximated GELU."""

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.gelu(x, approximate="tanh")


class Gemma2ScaledEmbedding(Embedding):
    """Token embeddings times ``sqrt(D)`` (the ``embed_scale`` buffer, in the weights' dtype)."""

    embed_scale: Tensor

    def __init__(self, vocab: int, d_model: int, padding_idx: int | None) -> None:
        super().__init__(vocab, d_model, padding_idx)
        self.scalar_embed_scale = d_model**0.5
        self.register_buffer("embed_scale", torch.empty(()), persistent=False)

    def forward(self, input: Tensor) -> Tensor:
        return super().forward(input) * self.embed_scale.to(self.weight.dtype)


def additive_mask(
    attention_mask: Tensor | None,
    batch: int,
    q_len: int,
    past: int,
    window: int | None,
    dtype: torch.dtype,
    device: torch.device,
) -> Tensor:
    """transformers' eager mask ``[B, 1, T, S]``: 0 where query ``q`` (position ``past + q``) sees key
    ``k`` (``k <= past + q``, within ``window`` when sliding, not padded), the dtype's minimum elsewhere."""
    kv_len = past + q_len
    q_pos = torch.arange(q_len, device=device) + past
    k_pos = torch.arange(kv_len, device=device)
    allowed = k_pos[None, None, None, :] <= q_pos[None, None, :, None]
    if window is not None:
        allowed = allowed & (k_pos[None, None, None, :] > q_pos[None, None, :, None] - window)
    if attention_mask is not None:
        if attention_mask.dim() != 2 or attention_mask.shape[-1] < kv_len:
            raise ValueError(f"native models take a 2-D [B, S] attention_mask covering the {kv_len} keys")
        allowed = allowed & attention_mask[:, None, None, -kv_len:].bool()
    allowed = allowed.expand(batch, -1, q_len, kv_len)
    return torch.where(allowed, torch.zeros((), device=device, dtype=dtype), torch.finfo(dtype).min)


class Gemma2Attention(nn.Module):
    def __init__(self, config: Any, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = int(config.head_dim)
        n_heads, n_kv = int(config.num_attention_heads), int(config.num_key_value_heads)
        if n_heads % n_kv:
            raise SettingError(f"Gemma-2 config: {n_heads} attention heads is not a multiple of {n_kv} key-value heads")
        self.num_key_value_groups = n_heads // n_kv
        self.scaling = config.query_pre_attn_scalar**-0.5
        self.softcap = config.attn_logit_softcapping
        self.sliding = config.layer_types[layer_idx] == "sliding_attention"
        bias, D = bool(config.attention_bias), int(config.hidden_size)
        self.q_proj = Linear(D, n_heads * self.head_dim, bias=bias)
        self.k_proj = Linear(D, n_kv * self.head_dim, bias=bias)
        self.v_proj = Linear(D, n_kv * self.head_dim, bias=bias)
        self.o_proj = Linear(n_heads * self.head_dim, D, bias=bias)

    def forward(
        self,
        hidden: Tensor,
        position_embeddings: tuple[Tensor, Tensor],
        mask: Tensor,
        cache: KVCache | None,
        rows: int = 0,
    ) -> Tensor:
        """``rows`` > 0: the projected output at the last ``rows`` positions only (``[B, n, D]``)."""
        shape = hidden.shape[:-1]
        head_shape = (*shape, -1, self.head_dim)
        q = self.q_proj(hidden).view(head_shape).transpose(1, 2)  # [B, H, T, d]
        k = self.k_proj(hidden).view(head_shape).transpose(1, 2)  # [B, H_kv, T, d]
        v = self.v_proj(hidden).view(head_shape).transpose(1, 2)
        q, k = apply_rotary(q, k, *position_embeddings)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # [B, H_kv, S, d]
        k, v = repeat_kv(k, self.num_key_value_groups), repeat_kv(v, self.num_key_value_groups)
        w = torch.matmul(q, k.transpose(2, 3)) * self.scaling  # [B, H, T, S]
        if self.softcap is not None:
            w = torch.tanh(w / self.softcap) * self.softcap
        w = nn.functional.softmax(w + mask, dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.matmul(w, v).transpose(1, 2).contiguous()  # [B, T, H, d]
        if rows:
            out, shape = out[:, -rows:], (shape[0], rows)  # [B, n, H, d]
        return self.o_proj(out.reshape(*shape, -1).contiguous())


class Gemma2MLP(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        D, F = int(config.hidden_size), int(config.intermediate_size)
        self.gate_proj = Linear(D, F, bias=False)
        self.up_proj = Linear(D, F, bias=False)
        self.down_proj = Linear(F, D, bias=False)
        if config.hidden_activation != "gelu_pytorch_tanh":
            raise SettingError(
                f"the native Gemma-2 has no activation {config.hidden_activation!r}; load this model with --model-backend hf"
            )
        self.act_fn = GELUTanh()

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class Gemma2DecoderLayer(nn.Module):
    def __init__(self, config: Any, layer_idx: int) -> None:
        super().__init__()
        D, eps = int(config.hidden_size), float(config.rms_norm_eps)
        self.self_attn = Gemma2Attention(config, layer_idx)
        self.mlp = Gemma2MLP(config)
        self.input_layernorm = Gemma2RMSNorm(D, eps)
        self.post_attention_layernorm = Gemma2RMSNorm(D, eps)
        self.pre_feedforward_layernorm = Gemma2RMSNorm(D, eps)
        self.post_feedforward_layernorm = Gemma2RMSNorm(D, eps)

    def forward(
        self,
        hidden: Tensor,
        mask: Tensor | None = None,
        position_embeddings: tuple[Tensor, Tensor] | None = None,
        cache: KVCache | None = None,
        rows: int = 0,
    ) -> Tensor:
        """hidden ``[B, T, D]`` -> ``[B, T, D]``, or ``[B, n, D]`` (the last positions) with ``rows`` = n > 0."""
        assert position_embeddings is not None and mask is not None
        residual = hidden[:, -rows:] if rows else hidden
        attn = self.self_attn(self.input_layernorm(hidden), position_embeddings, mask, cache, rows)
        hidden = residual + self.post_attention_layernorm(attn)
        residual = hidden
        return residual + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(hidden)))


class Gemma2Model(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        if getattr(config, "use_bidirectional_attention", None):
            raise SettingError("the native Gemma-2 is causal only; load this model with --model-backend hf")
        self.config = config
        D = int(config.hidden_size)
        self.embed_tokens = Gemma2ScaledEmbedding(int(config.vocab_size), D, config.pad_token_id)
        self.layers = nn.ModuleList(Gemma2DecoderLayer(config, i) for i in range(int(config.num_hidden_layers)))
        self.norm = Gemma2RMSNorm(D, float(config.rms_norm_eps))
        self.rotary_emb = RotaryEmbedding(config, int(config.head_dim))

    def forward(
        self,
        input_ids: Tensor | None,
        cache: KVCache | None,
        attention_mask: Tensor | None,
        position_ids: Tensor | None,
        inputs_embeds: Tensor | None,
        final_block_positions: int = 0,
    ) -> Tensor:
        hidden, past, position_ids = embed_inputs(self.embed_tokens, input_ids, inputs_embeds, cache, position_ids)
        B, T = hidden.shape[:2]  # hidden [B, T, D]
        rows = check_final_rows(final_block_positions, T)
        masks = {
            "full_attention": additive_mask(attention_mask, B, T, past, None, hidden.dtype, hidden.device),
            "sliding_attention": additive_mask(
                attention_mask, B, T, past, self.config.sliding_window, hidden.dtype, hidden.device
            ),
        }
        position_embeddings = self.rotary_emb(hidden, position_ids)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            final = {"rows": rows} if rows and i == last else {}
            hidden = layer(
                hidden,
                mask=masks[self.config.layer_types[i]],
                position_embeddings=position_embeddings,
                cache=cache,
                **final,
            )
        return self.norm(hidden)  # [B, T or n, D]


class NativeGemma2ForCausalLM(NativeCausalLM):
    """``Gemma2ForCausalLM`` without transformers: ``model`` (embed_tokens, layers, norm, rotary_emb) + ``lm_head``."""

    pie_arch = "gemma2"
    model: Gemma2Model

    def __init__(self, config: Any) -> None:
        super().__init__(config, Gemma2Model(config), int(config.hidden_size))

    def init_buffers(self, device: torch.device, dtype: torch.dtype) -> None:
        """The rotary inverse frequencies (float32) and the embedding scale (in ``dtype``, as
        transformers builds it under the load dtype)."""
        self.model.rotary_emb.reset(device)
        emb = self.model.embed_tokens
        emb.embed_scale = torch.tensor(emb.scalar_embed_scale, dtype=dtype, device=device)

    def cap_logits(self, logits: Tensor) -> Tensor:
        cap = self.config.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap
