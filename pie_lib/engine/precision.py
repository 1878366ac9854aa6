"""Forwards in float32 whatever dtype a model was loaded in, for the evaluations that need it.

FAP-Synergy compares small differences of the metric (``M({c, p}) - M({c}) - M({p})``) and keeps a
synergy only where single effects are ``> 0``: in bfloat16 the rounding alone changes its
selections on ~10% of prompts (issue 11). :func:`float32_weights` upcasts a local model's floating
parameters and buffers in place for the duration of a block and restores each tensor's own dtype
afterwards. bfloat16 / float16 -> float32 -> back is exact, so the model is bit-for-bit what it
was before, and the forwards inside the block are float32 forwards of the same weights.

A whole float32 copy is twice a bf16 model (+2.5 GB at Llama-3.2-1B, +5.2 GB at Gemma-2-2B). When
it would take more than :data:`FLOAT32_COPY_FRACTION` of the free memory, the upcast is done
module by module instead: each module that owns weights upcasts them as its forward starts and
restores them when it ends, so one module's float32 copy exists at a time. The arithmetic is the
same, so the numbers are bitwise those of the whole-model upcast (tested); it costs one
conversion of the weights per forward.

Two modules are not upcast whole, because they are the largest by far (Gemma-2-2B's 256,000 x
2,304 table is 2.36 GB in float32, and converting it held the bf16 and the float32 copy at once:
+3.5 GB measured, the peak of a full-shape run) and because their float32 result needs only part
of the float32 table at a time:

- an input embedding (``nn.Embedding``) runs on the float32 copies of the rows its ids use only
  (the ids remapped to them): a row gather commutes with an exact upcast, so the output, and
  whatever the module does to it (Gemma's scale), is bitwise the whole-table one;
- the unembedding (the output embedding, ``nn.Linear``) computes its logits over vocabulary chunks
  of :data:`UNEMBED_CHUNK_BYTES` of float32 weight; each logit is the same dot product over
  ``d_model`` as the unchunked matmul (tested bitwise against the whole-model upcast).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float
from torch import Tensor

from pie_lib.engine.memory import available_memory_bytes
from pie_lib.engine.remote import is_remote, server_dtype
from pie_lib.errors import SettingError

if TYPE_CHECKING:
    from pie_lib.models.loading import LoadedModel


def runs_in_float32(model: LoadedModel) -> bool:
    """True when every floating parameter of ``model`` (a :class:`~pie_lib.models.loading.LoadedModel`) is float32.

    Remote: the server's dtype (probed once; the local skeleton's meta parameters say nothing).
    """
    if is_remote(model):
        return server_dtype(model) == torch.float32
    return all(p.dtype == torch.float32 for p in model.hf.parameters() if p.is_floating_point())


#: A whole-model float32 copy may take at most this share of the free memory (the same budget
#: the patch chunks are sized from); above it the upcast goes module by module.
FLOAT32_COPY_FRACTION = 0.25


@contextmanager
def float32_weights(model: LoadedModel, per_module: bool | None = None) -> Iterator[bool]:
    """Upcast a local model to float32 inside the block; yields whether anything was converted.

    Args:
        per_module: upcast each module's own weights only while its forward runs (True), all at
            once (False), or choose from the free memory (None, see :data:`FLOAT32_COPY_FRACTION`).

    Raises:
        SettingError: the model runs remotely in another dtype (its weights are not here to cast).
    """
    if runs_in_float32(model):
        yield False
        return
    if model.remote:
        raise SettingError(
            f"float32 synergy forwards need the model's weights locally, but {model.name} runs remotely in "
            f"{str(server_dtype(model)).removeprefix('torch.')}; pass --synergy-precision model (and optionally --synergy-eff-tol) instead"
        )
    tensors = [t for t in (*model.hf.parameters(), *model.hf.buffers()) if t.is_floating_point()]
    dtypes = [t.dtype for t in tensors]
    if per_module is None:
        copy = sum(4 * t.numel() for t in tensors if t.dtype != torch.float32)
        per_module = copy > FLOAT32_COPY_FRACTION * available_memory_bytes(model.device)
    if per_module:
        with _upcast_per_module(model, tensors, dtypes):
            yield True
        return
    for t in tensors:
        t.data = t.data.to(torch.float32)
    try:
        yield True
    finally:
        for t, dt in zip(tensors, dtypes):
            t.data = t.data.to(dt)


#: Float32 weight bytes of one vocabulary chunk of the per-module unembedding.
UNEMBED_CHUNK_BYTES = 64 << 20


@contextmanager
def _upcast_per_module(model: LoadedModel, tensors: list[torch.Tensor], dtypes: list[torch.dtype]) -> Iterator[None]:
    """Buffers (small: rotary tables, norms' constants) upcast for the block; every module's own
    parameters upcast by a pre-hook and restored by a post-hook around its forward, except the
    input and output embeddings (:func:`_embedding_hooks`, :func:`_unembedding_hooks`). Modules a
    forward skips are never converted. Whatever happens, every tensor ends in its own dtype.
    ``model.extra["float32_forwards"]`` tells :func:`~pie_lib.engine.traces.parameter_precision`
    that forwards run in float32 although the parameters rest in their own dtype."""
    hf = model.hf
    params = {id(p) for p in hf.parameters()}
    for t in tensors:
        if id(t) not in params:
            t.data = t.data.to(torch.float32)
    original = {id(t): dt for t, dt in zip(tensors, dtypes)}
    get_head = getattr(hf, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    handles: list[torch.utils.hooks.RemovableHandle] = []

    def up(module: torch.nn.Module, _args: tuple) -> None:
        for p in module.parameters(recurse=False):
            if p.is_floating_point():
                p.data = p.data.to(torch.float32)

    def down(module: torch.nn.Module, _args: tuple, _out: object) -> None:
        for p in module.parameters(recurse=False):
            if p.is_floating_point():
                p.data = p.data.to(original[id(p)])

    model.extra["float32_forwards"] = True
    try:
        for module in hf.modules():
            if not any(p.is_floating_point() for p in module.parameters(recurse=False)):
                continue
            if (
                module is head
                and isinstance(module, torch.nn.Linear)
                and type(module).forward is torch.nn.Linear.forward
            ):
                handles += _unembedding_hooks(module)
            elif isinstance(module, torch.nn.Embedding) and module.max_norm is None:
                handles += _embedding_hooks(module)
            else:
                handles.append(module.register_forward_pre_hook(up))
                handles.append(module.register_forward_hook(down))
        yield
    finally:
        model.extra.pop("float32_forwards", None)
        for h in handles:
            h.remove()
        for t, dt in zip(tensors, dtypes):
            t.data = t.data.to(dt)


def _embedding_hooks(module: torch.nn.Embedding) -> list[torch.utils.hooks.RemovableHandle]:
    """Float32 lookups from the float32 copies of the rows the ids use, the table left as it is.

    The pre-hook swaps the weight's data for ``[U, D]`` float32 rows (the ids' unique values) and
    the ids for their positions among them; the post-hook puts the table back (the same tensor: no
    conversion). ``padding_idx`` only shapes the weight's gradient (never taken: weights are
    frozen), so it is unset while the remapped ids run.
    """
    state: list[tuple[torch.Tensor, int | None]] = []

    def pre(_mod: torch.nn.Module, args: tuple) -> tuple:
        if not args or not isinstance(args[0], torch.Tensor) or args[0].is_floating_point():
            raise SettingError(f"float32 forwards: {type(module).__name__} was called without token ids")
        table = module.weight.data
        uniq, inv = torch.unique(args[0], return_inverse=True)
        state.append((table, module.padding_idx))
        module.weight.data = table[uniq].to(torch.float32)
        module.padding_idx = None  # pyright: ignore[reportAttributeAccessIssue]  # (nn.Embedding's int | None)
        return (inv, *args[1:])

    def post(_mod: torch.nn.Module, _args: tuple, _out: object) -> None:
        table, padding_idx = state.pop()
        module.weight.data = table
        module.padding_idx = padding_idx  # pyright: ignore[reportAttributeAccessIssue]

    return [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]


def _unembedding_hooks(module: torch.nn.Linear) -> list[torch.utils.hooks.RemovableHandle]:
    """Float32 logits over vocabulary chunks, the weight left as it is.

    The pre-hook swaps the weight (and bias) for empty float32 ones, so the module's own forward
    costs nothing; the post-hook restores them and returns the logits computed chunk by chunk from
    the (float32) input it was given.
    """
    state: list[tuple[torch.Tensor, torch.Tensor | None]] = []
    empty = torch.empty(0, module.in_features, dtype=torch.float32, device=module.weight.device)
    bias_param: torch.Tensor | None = module.bias

    def pre(_mod: torch.nn.Module, _args: tuple) -> None:
        state.append((module.weight.data, None if bias_param is None else bias_param.data))
        module.weight.data = empty
        if bias_param is not None:
            bias_param.data = empty[:, 0]

    def post(_mod: torch.nn.Module, args: tuple, _out: object) -> torch.Tensor:
        weight, bias = state.pop()
        module.weight.data = weight
        if bias_param is not None and bias is not None:
            bias_param.data = bias
        return chunked_float32_linear(args[0], weight, bias)

    return [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]


def chunked_float32_linear(
    x: Float[Tensor, "*lead D"], weight: Float[Tensor, "V D"], bias: Float[Tensor, " V"] | None = None
) -> Float[Tensor, "*lead V"]:
    """``F.linear(x, weight.float(), bias.float())`` with about :data:`UNEMBED_CHUNK_BYTES` of float32
    weight alive at a time: the output columns are computed block by block of weight rows.

    Blocks are whole multiples of :data:`_CHUNK_ROWS` rows and the last one is never shorter (a
    shorter remainder joins the block before it): measured on this CPU's matmul (MKL), blocks of a
    few rows take another code path whose sums round differently, while blocks of >= 256 rows give
    every logit bitwise as the unchunked matmul, for 1-1,000 input rows and any vocabulary size
    (``tests/test_float32_memory.py``).
    """
    if x.dtype != torch.float32:
        raise SettingError(f"chunked_float32_linear expects a float32 input, got {x.dtype}")
    V, D = weight.shape
    flat = x.reshape(-1, D)
    out = torch.empty(flat.shape[0], V, dtype=torch.float32, device=x.device)
    step = max(1, UNEMBED_CHUNK_BYTES // (4 * D) // _CHUNK_ROWS) * _CHUNK_ROWS
    bounds = [*range(0, V, step), V]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] < _CHUNK_ROWS:
        del bounds[-2]
    for a, b in zip(bounds[:-1], bounds[1:]):
        out[:, a:b] = torch.nn.functional.linear(
            flat, weight[a:b].to(torch.float32), None if bias is None else bias[a:b].to(torch.float32)
        )
    return out.reshape(*x.shape[:-1], V)


_CHUNK_ROWS = 256


__all__ = [
    "FLOAT32_COPY_FRACTION",
    "UNEMBED_CHUNK_BYTES",
    "chunked_float32_linear",
    "float32_weights",
    "runs_in_float32",
]
