"""Llama (``LlamaForCausalLM``'s module tree and parameter names), forward as transformers 5.24's
with its SDPA attention, grouped-query attention and RoPE (default or llama3). Shapes: B batch,
T new positions, S keys, D width, H query heads, H_kv key-value heads, d head size."""

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
    RMSNorm,
    activation,
    causal_mask,
    check_final_rows,
    embed_inputs,
    sdpa_attention,
)
from pie_lib.models.native.rope import RotaryEmbedding, apply_rotary


def _head_dim(config: Any) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


class LlamaAttention(nn.Module):
    def __init__(self, config: Any, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = _head_dim(config)
        n_heads, n_kv = int(config.num_attention_heads), int(config.num_key_value_heads)
        if n_heads % n_kv:
            raise SettingError(f"Llama config: {n_heads} attention heads is not a multiple of {n_kv} key-value heads")
        self.num_key_value_groups = n_heads // n_kv
        self.scaling = self.head_dim**-0.5
        bias, D = bool(config.attention_bias), int(config.hidden_size)
        self.q_proj = Linear(D, n_heads * self.head_dim, bias=bias)
        self.k_proj = Linear(D, n_kv * self.head_dim, bias=bias)
        self.v_proj = Linear(D, n_kv * self.head_dim, bias=bias)
        self.o_proj = Linear(n_heads * self.head_dim, D, bias=bias)

    def forward(
        self,
        hidden: Tensor,
        position_embeddings: tuple[Tensor, Tensor],
        mask: Tensor | None,
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
        out = sdpa_attention(q, k, v, mask, self.scaling, self.num_key_value_groups)  # [B, T, H, d]
        if rows:
            out, shape = out[:, -rows:], (shape[0], rows)  # [B, n, H, d]
        return self.o_proj(out.reshape(*shape, -1).contiguous())


class LlamaMLP(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        D, F, bias = int(config.hidden_size), int(config.intermediate_size), bool(config.mlp_bias)
        self.gate_proj = Linear(D, F, bias=bias)
        self.up_proj = Linear(D, F, bias=bias)
        self.down_proj = Linear(F, D, bias=bias)
        self.act_fn = activation(config.hidden_act, "Llama")

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: Any, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_idx)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = RMSNorm(int(config.hidden_size), float(config.rms_norm_eps))
        self.post_attention_layernorm = RMSNorm(int(config.hidden_size), float(config.rms_norm_eps))

    def forward(
        self,
        hidden: Tensor,
        mask: Tensor | None = None,
        position_embeddings: tuple[Tensor, Tensor] | None = None,
        cache: KVCache | None = None,
        rows: int = 0,
    ) -> Tensor:
        """hidden ``[B, T, D]`` -> ``[B, T, D]``, or ``[B, n, D]`` (the last positions) with ``rows`` = n > 0."""
        assert position_embeddings is not None
        residual = hidden[:, -rows:] if rows else hidden
        hidden = residual + self.self_attn(self.input_layernorm(hidden), position_embeddings, mask, cache, rows)
        residual = hidden
        return residual + self.mlp(self.post_attention_layernorm(hidden))


class LlamaModel(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        if int(getattr(config, "pretraining_tp", 1) or 1) != 1:
            raise SettingError("the native Llama has no pretraining_tp > 1; load this model with --model-backend hf")
        self.config = config
        D = int(config.hidden_size)
        self.embed_tokens = Embedding(int(config.vocab_size), D)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i) for i in range(int(config.num_hidden_layers)))
        self.norm = RMSNorm(D, float(config.rms_norm_eps))
        self.rotary_emb = RotaryEmbedding(config, _head_dim(config))

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
        mask = causal_mask(attention_mask, B, T, past, hidden.device)
        position_embeddings = self.rotary_emb(hidden, position_ids)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            final = {"rows": rows} if rows and i == last else {}
            hidden = layer(hidden, mask=mask, position_embeddings=position_embeddings, cache=cache, **final)
        return self.norm(hidden)  # [B, T or n, D]


class NativeLlamaForCausalLM(NativeCausalLM):
    """``LlamaForCausalLM`` without transformers: ``model`` (embed_tokens, layers, norm, rotary_emb) + ``lm_head``."""

    pie_arch = "llama"
    model: LlamaModel

    def __init__(self, config: Any) -> None:
        super().__init__(config, LlamaModel(config), int(config.hidden_size))
        # NativeConfig has resolved num_key_value_heads (None -> num_attention_heads)
        self.pads_short_query_blocks = int(config.num_key_value_heads) == int(config.num_attention_heads)

    def init_buffers(self, device: torch.device, dtype: torch.dtype) -> None:
        """Compute the rotary inverse frequencies (float32) on ``device``."""
        self.model.rotary_emb.reset(device)
