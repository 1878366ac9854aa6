"""Masked forwards *with* autograd (mask learning: Edge Pruning, HAP, ensemble-seq) and the KL
divergence every forward of the method is scored by.

:func:`last_token_kl` is the one implementation of ``KL(P_clean || P)`` at the last token (the
patching evaluator, mask learning and the precision benchmarks all call it).
"""

from __future__ import annotations

from typing import Any

import torch

from pie_lib.engine import remote as remote_
from pie_lib.engine.remote import is_remote
from pie_lib.engine.traces import _logits, _val, _walk_layers
from pie_lib.errors import SettingError
from pie_lib.models.loading import LoadedModel


def last_token_kl(clean_logits: torch.Tensor, logits: torch.Tensor, floor_at_zero: bool = True) -> torch.Tensor:
    """``KL(P_clean || P)`` over the vocabulary at the last position, ``[B, V] -> [B]`` (float32).

    Args:
        floor_at_zero: clamp tiny negative values (float rounding) to 0 -- for reported KLs; mask
            learning keeps the raw value so its gradient is never cut.
    """
    lp = torch.log_softmax(clean_logits.float(), -1)
    lq = torch.log_softmax(logits.float(), -1)
    kl = (lp.exp() * (lp - lq)).sum(-1)
    return kl.clamp_min(0.0) if floor_at_zero else kl


def masked_last_logits(model: LoadedModel, input_ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Real-model forward with ``offsets`` subtracted from every MLP output, *with* autograd.

    The differentiable twin of :func:`pie_lib.engine.traces.patched_last_logits`: the returned
    logits carry a graph back to ``offsets`` (and whatever produced them).

    Args:
        input_ids: ``[B, T]``; offsets: ``[L, B, T, D]``.
    Returns:
        ``[B, V]`` last-token logits (float32).
    """
    if is_remote(model):
        raise SettingError(
            "mask-learning methods (edge-pruning, hap, ensemble-seq) backpropagate into offsets built here, "
            "which cannot cross to an NDIF server; run them without --remote"
        )

    def sub(layer: int, env: Any) -> None:
        env.output = env.output - offsets[layer].to(env.output.dtype)

    with torch.enable_grad(), remote_.trace(model, input_ids.to(model.device)):
        _walk_layers(model, {model.arch.mlp_out: sub})
        last = _logits(model)[:, -1].save()
    return _val(last).float()
