"""GPT-2 (``GPT2LMHeadModel``'s module tree and parameter names), forward as transformers 5.24's
with its SDPA attention. Shapes: B batch, T new positions, S keys, D width, H heads, d = D / H."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from pie_lib.errors import SettingError
from pie_lib.models.native.common import (
    Conv1D,
    Embedding,
    KVCache,
    LayerNorm,
    NativeCausalLM,
    activation,
    causal_mask,
    check_final_rows,
    embed_inputs,
    sdpa_attention,
)


class GPT2Attention(nn.Module):
    def __init__(self, config: Any, layer_idx: int) -> None:
        super().__init__()
        d_model, n_heads = int(config.n_embd), int(config.n_head)
        if d_model % n_heads:
            raise SettingError(f"GPT-2 config: n_embd {d_model} is not a multiple of n_head {n_heads}")
        self.n_heads, self.head_dim, self.split_size = n_heads, d_model // n_heads, d_model
        self.layer_idx = layer_idx
        self.scaling = self.head_dim**-0.5 if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:
            self.scaling /= float(layer_idx + 1)
        self.c_attn = Conv1D(3 * d_model, d_model)
        self.c_proj = Conv1D(d_model, d_model)
        self.attn_dropout = nn.Dropout(config.attn_pdrop)
        self.resid_dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, hidden: Tensor, cache: KVCache | None, mask: Tensor | None, rows: int = 0) -> Tensor:
        """``rows`` > 0: the projected output at the last ``rows`` positions only (``[B, n, D]``)."""
        q, k, v = self.c_attn(hidden).split(self.split_size, dim=2)  # each [B, T, D]
        kv_shape = (*k.shape[:-1], -1, self.head_dim)
        k = k.view(kv_shape).transpose(1, 2)  # [B, H, T, d]
        v = v.view(kv_shape).transpose(1, 2)
        q = q.view((*q.shape[:-1], -1, self.head_dim)).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # [B, H, S, d]
        out = sdpa_attention(q, k, v, mask, self.scaling)  # [B, T, H, d]
        if rows:
            out = out[:, -rows:]  # [B, n, H, d]
        out = out.reshape(*out.shape[:-2], -1).contiguous()
        return self.resid_dropout(self.c_proj(out))


class GPT2MLP(nn.Module):
    def __init__(self, inner: int, config: Any) -> None:
        super().__init__()
        self.c_fc = Conv1D(inner, int(config.n_embd))
        self.c_proj = Conv1D(int(config.n_embd), inner)
        self.act = activation(config.activation_function, "GPT-2")
        self.dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, hidden: Tensor) -> Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(hidden))))


class GPT2Block(nn.Module):
    def __init__(self, config: Any, layer_idx: int) -> None:
        super().__init__()
        d_model = int(config.n_embd)
        inner = int(config.n_inner) if config.n_inner is not None else 4 * d_model
        self.ln_1 = LayerNorm(d_model, eps=config.layer_norm_epsilon)
        self.attn = GPT2Attention(config, layer_idx)
        self.ln_2 = LayerNorm(d_model, eps=config.layer_norm_epsilon)
        self.mlp = GPT2MLP(inner, config)

    def forward(
        self, hidden: Tensor, cache: KVCache | None = None, mask: Tensor | None = None, rows: int = 0
    ) -> Tensor:
        """hidden ``[B, T, D]`` -> ``[B, T, D]``, or ``[B, n, D]`` (the last positions) with ``rows`` = n > 0."""
        residual = hidden[:, -rows:] if rows else hidden
        hidden = self.attn(self.ln_1(hidden), cache, mask, rows) + residual
        residual = hidden
        return residual + self.mlp(self.ln_2(hidden))


class GPT2Model(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        if getattr(config, "add_cross_attention", False):
            raise SettingError("the native GPT-2 has no cross-attention; load this model with --model-backend hf")
        d_model = int(config.n_embd)
        self.config = config
        self.wte = Embedding(int(config.vocab_size), d_model)
        self.wpe = Embedding(int(config.n_positions), d_model)
        self.drop = nn.Dropout(config.embd_pdrop)
        self.h = nn.ModuleList(GPT2Block(config, i) for i in range(int(config.n_layer)))
        self.ln_f = LayerNorm(d_model, eps=config.layer_norm_epsilon)

    def forward(
        self,
        input_ids: Tensor | None,
        cache: KVCache | None,
        attention_mask: Tensor | None,
        position_ids: Tensor | None,
        inputs_embeds: Tensor | None,
        final_block_positions: int = 0,
    ) -> Tensor:
        embeds, past, position_ids = embed_inputs(self.wte, input_ids, inputs_embeds, cache, position_ids)
        B, T = embeds.shape[:2]  # embeds [B, T, D]
        rows = check_final_rows(final_block_positions, T)
        hidden = embeds + self.wpe(position_ids).to(embeds.device)
        mask = causal_mask(attention_mask, B, T, past, embeds.device)
        hidden = self.drop(hidden)
        last = len(self.h) - 1
        for i, block in enumerate(self.h):
            hidden = block(hidden, cache, mask, rows) if rows and i == last else block(hidden, cache, mask)
        return self.ln_f(hidden)  # [B, T or n, D]


class NativeGPT2LMHeadModel(NativeCausalLM):
    """``GPT2LMHeadModel`` without transformers: ``transformer`` (wte, wpe, drop, h, ln_f) + ``lm_head``."""

    pie_arch = "gpt2"
    backbone_name = "transformer"
    embedding_name = "wte"
    pads_short_query_blocks = True
    transformer: GPT2Model

    def __init__(self, config: Any) -> None:
        super().__init__(config, GPT2Model(config), int(config.n_embd))
