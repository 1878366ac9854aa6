"""Parts every native architecture shares: the output, the key-value cache, the causal mask and
SDPA call as transformers 5.24 makes them, the activations, norms and GPT-2's Conv1D.

Bitwise agreement with transformers rests on doing the same operations in the same order; each
function names what it mirrors. Shapes: B batch, H heads (H_kv key-value heads), T new positions,
P cached positions, S = P + T keys, d head size, D model width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from pie_lib.models.activations import gelu_new_blocked


class KVCache:
    """Keys and values per decoder layer, grown along the position axis (transformers'
    ``DynamicCache`` semantics: the first update stores, later ones concatenate).

    ``layers[i].keys`` / ``.values`` are ``[B, H_kv, S, d]``, what ``engine/traces.py`` reads back.

    ``filled``: a layer whose cached keys are longer than this is a preallocated buffer holding
    positions ``0..filled-1``; its updates are written in place after them (no concatenation, which
    would copy the cached positions once more) and return the buffer's filled part.
    """

    @dataclass
    class Layer:
        keys: Tensor
        values: Tensor
        filled: int | None = None  # a preallocated buffer: positions 0..filled-1 hold keys and values

    def __init__(self, kv: list[tuple[Tensor, Tensor]] | None = None, filled: int | None = None) -> None:
        self.layers: list[KVCache.Layer] = [
            KVCache.Layer(k, v, filled if filled is not None and k.shape[-2] > filled else None) for k, v in (kv or [])
        ]
        self.past = filled  # the cached length, whatever the layers' buffers

    def get_seq_length(self) -> int:
        if self.past is not None:
            return self.past
        return int(self.layers[0].keys.shape[-2]) if self.layers else 0

    def update(self, keys: Tensor, values: Tensor, layer: int) -> tuple[Tensor, Tensor]:
        """Append ``keys``/``values`` ``[B, H_kv, T, d]`` to layer ``layer``; return the whole ``[B, H_kv, S, d]``."""
        if layer < len(self.layers):
            entry = self.layers[layer]
            if entry.filled is not None:
                end = entry.filled + keys.shape[-2]
                if end > entry.keys.shape[-2]:
                    raise IndexError(
                        f"cache update of layer {layer} past its buffer of {entry.keys.shape[-2]} positions"
                    )
                entry.keys[:, :, entry.filled : end] = keys
                entry.values[:, :, entry.filled : end] = values
                entry.filled = end
                return entry.keys[:, :, :end], entry.values[:, :, :end]
            entry.keys = torch.cat([entry.keys, keys], dim=-2)
            entry.values = torch.cat([entry.values, values], dim=-2)
        elif layer == len(self.layers):
            self.layers.append(KVCache.Layer(keys, values))
        else:  # pragma: no cover - layers run in order
            raise IndexError(f"cache update of layer {layer} before layer {len(self.layers)}")
        return self.layers[layer].keys, self.layers[layer].values


@dataclass
class CausalLMOutput:
    """What a native causal LM's forward returns: ``logits`` ``[B, T_kept, V]`` and the cache (or None)."""

    logits: Tensor
    cache: KVCache | None = None

    def __getitem__(self, i: int) -> Tensor | KVCache | None:  # out[0] is the logits, as for a ModelOutput
        return (self.logits, self.cache)[i]


def causal_mask(
    attention_mask: Tensor | None, batch: int, q_len: int, past: int, device: torch.device
) -> Tensor | None:
    """``None`` (SDPA's ``is_causal``) or a boolean ``[B, 1, T, S]`` mask, as transformers'
    ``create_causal_mask`` + ``sdpa_mask`` decide it.

    None when nothing is padded and either one query or as many queries as keys (then SDPA's own
    causal alignment is right); otherwise query ``q`` (absolute position ``past + q``) sees key
    ``k`` when ``k <= past + q`` and ``attention_mask[b, k]`` is set.
    """
    kv_len = past + q_len
    padding = None
    if attention_mask is not None:
        if attention_mask.dim() != 2:
            raise ValueError("native models take a 2-D [B, S] attention_mask")
        padding = attention_mask[:, -kv_len:].bool() if attention_mask.shape[-1] > kv_len else attention_mask.bool()
        if padding.shape[-1] != kv_len:
            raise ValueError(f"attention_mask covers {padding.shape[-1]} positions; the forward has {kv_len} keys")
    if (q_len == 1 or kv_len == q_len) and (padding is None or bool(padding.all())):
        return None
    q_pos = torch.arange(q_len, device=device) + past
    k_pos = torch.arange(kv_len, device=device)
    mask = k_pos[None, None, None, :] <= q_pos[None, None, :, None]  # [1, 1, T, S]
    if padding is not None:
        mask = mask & padding[:, None, None, :]
    return mask.expand(batch, -1, q_len, kv_len)


def check_final_rows(rows: int, q_len: int) -> int:
    """``final_block_positions`` checked against the forward's ``q_len`` new positions; 0 for all."""
    if not isinstance(rows, int) or not 0 <= rows <= q_len:
        raise ValueError(f"final_block_positions {rows!r}: use an int in 0..{q_len} (0: every position)")
    return 0 if rows == q_len else rows


def repeat_kv(x: Tensor, n_rep: int) -> Tensor:
    """``[B, H_kv, S, d]`` -> ``[B, H_kv * n_rep, S, d]``, each key-value head repeated ``n_rep`` times."""
    if n_rep == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None, :, :].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


#: SDPA's CPU kernel splits fewer than SDPA_BLOCKED_KEYS keys' queries into blocks of SDPA_QUERY_BLOCK
#: rows, and computes a block of fewer than SDPA_SMALL_BLOCK rows along another path (measured on
#: torch 2.13; engine/traces.py:exact_suffix_start states the consequences).
SDPA_QUERY_BLOCK = 32
SDPA_SMALL_BLOCK = 4
SDPA_BLOCKED_KEYS = 192
#: torch's CPU matmul (``addmm``) computes an input of fewer rows than this along another path,
#: whose rounding differs from the same rows inside a larger input (measured on torch 2.13)
MIN_MATMUL_ROWS = 4


def short_block_padding(q_len: int, kv_len: int) -> int:
    """Query rows to add so that a cached suffix (``q_len < kv_len``) has no 1-3-row last block.

    Padded, every real row of the suffix rounds as the same position of the whole-prompt forward
    (``tests/test_native.py``), so prefix reuse need not start earlier than the first changed
    position. Whole forwards (``q_len == kv_len``) and ``kv_len >= 192`` are left alone.
    """
    if q_len >= kv_len or kv_len >= SDPA_BLOCKED_KEYS:
        return 0
    tail = q_len % SDPA_QUERY_BLOCK
    return SDPA_SMALL_BLOCK - tail if 0 < tail < SDPA_SMALL_BLOCK else 0


def exact_final_rows(batch: int, q_len: int) -> int:
    """How many last positions a forward of ``batch x q_len`` new positions may give its final block
    (``final_block_positions``) with every kept row bitwise the full forward's; 0: run it whole.

    The block's attention runs whole, so only its per-row operations see fewer rows; each of their
    matmuls must keep :data:`MIN_MATMUL_ROWS` rows (``batch x n``).
    """
    n = -(-MIN_MATMUL_ROWS // max(1, batch))
    return n if n < q_len else 0


def sdpa_attention(
    query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None, scaling: float, n_rep: int = 1
) -> Tensor:
    """transformers' ``sdpa_attention_forward`` on a CPU/CUDA device (no dropout, no soft-cap).

    Grouped queries: ``enable_gqa`` when unmasked, the single query folded onto the key-value
    heads when masked and T = 1, ``repeat_kv`` otherwise -- the three paths transformers takes.
    query ``[B, H, T, d]``, key/value ``[B, H_kv, S, d]``; returns ``[B, T, H, d]`` contiguous.
    """
    kw: dict = {}
    q_len = query.shape[2]
    pad = short_block_padding(q_len, key.shape[2]) if n_rep == 1 else 0
    if pad:
        # a cached suffix whose last query block would have 1-3 rows: SDPA's CPU kernel computes
        # such a block along another path, rounding unlike the whole-prompt forward's rows; copies
        # of the last query (dropped below) make it a block of 4, whose rows round as they do there
        if mask is None:  # one query, after the cache: it sees every key
            mask = torch.ones(query.shape[0], 1, q_len, key.shape[2], dtype=torch.bool, device=query.device)
        query = torch.cat([query, query[:, :, -1:].expand(-1, -1, pad, -1)], dim=2)
        mask = torch.cat([mask, mask[:, :, -1:].expand(-1, -1, pad, -1)], dim=2)
    if n_rep > 1:
        if mask is None and key.shape[-1] == value.shape[-1] <= 256:
            kw["enable_gqa"] = True
        elif q_len == 1:
            b, h, _, d = query.shape
            query = query.reshape(b, h // n_rep, n_rep, d)
        else:
            key, value = repeat_kv(key, n_rep), repeat_kv(value, n_rep)
    is_causal = q_len > 1 and mask is None
    if is_causal and key.shape[2] > q_len:  # pragma: no cover - only a pre-filled static cache does this
        key, value = key[:, :, :q_len], value[:, :, :q_len]
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, dropout_p=0.0, scale=scaling, is_causal=is_causal, **kw
    )
    if pad:
        out = out[:, :, :q_len]
    out = out.reshape(out.shape[0], -1, q_len, value.shape[-1])
    return out.transpose(1, 2).contiguous()


class Linear(nn.Linear):
    """``nn.Linear`` built without initialising its weights (they are read from the checkpoint):
    torch's random init of a meta tensor imports ``torch._dynamo`` (~1 s)."""

    def reset_parameters(self) -> None:
        pass


class Embedding(nn.Embedding):
    """``nn.Embedding`` built without initialising its weights (see :class:`Linear`)."""

    def reset_parameters(self) -> None:
        pass


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` built without initialising its weights (see :class:`Linear`)."""

    def reset_parameters(self) -> None:
        pass


class Conv1D(nn.Module):
    """GPT-2's transposed linear layer: ``weight`` ``[D_in, D_out]``, ``y = addmm(bias, x, weight)``."""

    def __init__(self, n_out: int, n_in: int) -> None:
        super().__init__()
        self.nf, self.nx = n_out, n_in
        self.weight = nn.Parameter(torch.empty(n_in, n_out))
        self.bias = nn.Parameter(torch.empty(n_out))

    def forward(self, x: Tensor) -> Tensor:
        shape = (*x.shape[:-1], self.nf)
        return torch.addmm(self.bias, x.view(-1, x.shape[-1]), self.weight).view(shape)


class RMSNorm(nn.Module):
    """Llama's RMSNorm: normalise in float32, cast back, then scale (``weight * x``)."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(size))
        self.variance_epsilon = eps

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        h = x.to(torch.float32)
        variance = h.pow(2).mean(-1, keepdim=True)
        h = h * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * h.to(dtype)


_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


class NewGELU(nn.Module):
    """GPT-2's ``gelu_new``; CPU inference takes the blocked path of :mod:`pie_lib.models.activations`
    (the same bits), anything recording autograd or on another device the whole-tensor formula."""

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type == "cpu" and not (torch.is_grad_enabled() and x.requires_grad):
            return gelu_new_blocked(x)
        return 0.5 * x * (1.0 + torch.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * torch.pow(x, 3.0))))


class SiLU(nn.Module):
    """``silu``, as transformers' ``SiLUActivation``."""

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.silu(x)


ACTIVATIONS: dict[str, type[nn.Module]] = {"gelu_new": NewGELU, "silu": SiLU, "swish": SiLU}


def activation(name: str, arch: str) -> nn.Module:
    """The activation module of ``name``; a clear error for one the native backend lacks."""
    from pie_lib.errors import SettingError

    if name not in ACTIVATIONS:
        raise SettingError(
            f"the native {arch} backend has no activation {name!r} (it has {', '.join(sorted(ACTIVATIONS))}); "
            "load this model with --model-backend hf"
        )
    return ACTIVATIONS[name]()


def embed_inputs(
    embedding: nn.Module,
    input_ids: Tensor | None,
    inputs_embeds: Tensor | None,
    cache: KVCache | None,
    position_ids: Tensor | None,
) -> tuple[Tensor, int, Tensor]:
    """A decoder's first step: ``(embeds [B, T, D], past, position_ids [1 or B, T])``.

    Exactly one of ``input_ids`` / ``inputs_embeds``; ``past`` is the cache's length, and positions
    default to ``past .. past + T - 1``.
    """
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of input_ids and inputs_embeds")
    embeds = embedding(input_ids) if inputs_embeds is None else inputs_embeds
    past = cache.get_seq_length() if cache is not None else 0
    if position_ids is None:
        position_ids = (torch.arange(embeds.shape[1], device=embeds.device) + past).unsqueeze(0)
    return embeds, past, position_ids


def keep_last(hidden: Tensor, logits_to_keep: int) -> Tensor:
    """transformers' ``slice_logits_to_keep`` for an int: the last ``logits_to_keep`` positions (0: all)."""
    if not isinstance(logits_to_keep, int):
        raise ValueError("native models take an int logits_to_keep")
    return hidden[:, -logits_to_keep:, :] if logits_to_keep else hidden


class NativeCausalLM(nn.Module):
    """A decoder and its unembedding ``lm_head``: what the native causal LMs share.

    A subclass names the architecture (``pie_arch``), the decoder's attribute (``backbone_name``:
    GPT-2's ``transformer``, Llama's and Gemma-2's ``model``, as in transformers) and its
    embedding's (``embedding_name``), and may soft-cap the logits (:meth:`cap_logits`). The decoder
    takes ``(input_ids, cache, attention_mask, position_ids, inputs_embeds, final_block_positions)``
    and returns the final-normed hidden states ``[B, T, D]`` (``[B, n, D]`` for ``n`` final positions).

    ``final_block_positions`` ``n`` > 0: the last decoder block runs its attention at every position
    (the cache gets every key and value), then its output projection, residual, norms and MLP at
    the last ``n`` positions only, so those modules' outputs (and hooks on them) are ``[B, n, D]``.
    A caller that reads only the last position's logits skips ~3/4 of that block's matmuls;
    :func:`exact_final_rows` says which ``n`` keeps the rows bitwise the full forward's. (Attention
    for the last queries only does not: SDPA's CPU kernel rounds a query row by the size of its
    query block, for some head sizes by any size -- measured, e.g. head size 8 -- and its cost is
    small at these lengths.)
    """

    pie_arch: str
    backbone_name: str = "model"
    embedding_name: str = "embed_tokens"
    pads_short_query_blocks: bool = False  # every attention goes through sdpa_attention without grouped queries

    def __init__(self, config: Any, backbone: nn.Module, d_model: int) -> None:
        super().__init__()
        self.config = config
        self.add_module(self.backbone_name, backbone)
        self.lm_head = Linear(d_model, int(config.vocab_size), bias=False)

    def _backbone(self) -> nn.Module:
        return getattr(self, self.backbone_name)

    def get_input_embeddings(self) -> nn.Embedding:
        return getattr(self._backbone(), self.embedding_name)

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def can_generate(self) -> bool:
        return False

    def init_buffers(self, device: torch.device, dtype: torch.dtype) -> None:
        """Compute the buffers a checkpoint does not hold, on ``device`` (none by default)."""

    def cap_logits(self, logits: Tensor) -> Tensor:
        return logits

    def forward(
        self,
        input_ids: Tensor | None = None,
        cache: KVCache | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        final_block_positions: int = 0,
    ) -> CausalLMOutput:
        if use_cache and cache is None:
            cache = KVCache()
        hidden = self._backbone()(
            input_ids, cache, attention_mask, position_ids, inputs_embeds, final_block_positions
        )  # [B, T or n, D]
        logits = self.cap_logits(self.lm_head(keep_last(hidden, logits_to_keep)))
        return CausalLMOutput(logits=logits, cache=cache if (use_cache or cache is not None) else None)
