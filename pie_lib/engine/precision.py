"""Forwards in float32 whatever dtype a model was loaded in, for the evaluations that need it.

FAP-Synergy compares small differences of the metric (``M({c, p}) - M({c}) - M({p})``) and keeps a
synergy only where single effects are ``> 0``: in bfloat16 the rounding alone changes its
selections on ~10% of prompts (issue 11). :func:`float32_weights` upcasts a local model's floating
parameters and buffers in place for the duration of a block and restores each tensor's own dtype
afterwards. bfloat16 / float16 -> float32 -> back is exact, so the model is bit-for-bit what it
was before, and the forwards inside the block are float32 forwards of the same weights.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch

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


@contextmanager
def float32_weights(model: LoadedModel) -> Iterator[bool]:
    """Upcast a local model to float32 inside the block; yields whether anything was converted.

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
    for t in tensors:
        t.data = t.data.to(torch.float32)
    try:
        yield True
    finally:
        for t, dt in zip(tensors, dtypes):
            t.data = t.data.to(dt)


__all__ = ["float32_weights", "runs_in_float32"]
