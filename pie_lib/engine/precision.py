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
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch

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


@contextmanager
def _upcast_per_module(model: LoadedModel, tensors: list[torch.Tensor], dtypes: list[torch.dtype]) -> Iterator[None]:
    """Buffers (small: rotary tables, norms' constants) upcast for the block; every module's own
    parameters upcast by a pre-hook and restored by a post-hook around its forward. Modules a
    forward skips are never converted. Whatever happens, every tensor ends in its own dtype.
    ``model.extra["float32_forwards"]`` tells :func:`~pie_lib.engine.traces.parameter_precision`
    that forwards run in float32 although the parameters rest in their own dtype."""
    hf = model.hf
    params = {id(p) for p in hf.parameters()}
    for t in tensors:
        if id(t) not in params:
            t.data = t.data.to(torch.float32)
    original = {id(t): dt for t, dt in zip(tensors, dtypes)}
    handles = []

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
            if any(p.is_floating_point() for p in module.parameters(recurse=False)):
                handles.append(module.register_forward_pre_hook(up))
                handles.append(module.register_forward_hook(down))
        yield
    finally:
        model.extra.pop("float32_forwards", None)
        for h in handles:
            h.remove()
        for t, dt in zip(tensors, dtypes):
            t.data = t.data.to(dt)


__all__ = ["FLOAT32_COPY_FRACTION", "float32_weights", "runs_in_float32"]
