"""The paper's methods (FAP and its variants, the baselines) as entries of the method registry.

Importing this module registers them in :data:`pie_lib.prune.registry.METHODS`; the related
methods (Edge Pruning, HAP, ensembles) are a second plugin, :mod:`pie_lib.prune.related`.
Their hyper-parameters are :class:`pie_lib.prune.params.MethodParams`.
"""

from __future__ import annotations

from typing import Callable, cast

import torch

from pie_lib.engine.traces import GradientMode
from pie_lib.prune.context import BatchContext
from pie_lib.prune.params import MethodParams
from pie_lib.prune.registry import Selector, register_method
from pie_lib.prune.scores import activation_magnitude, factp_scores, fap_scores, random_scores
from pie_lib.prune.select import (
    Budget,
    SynergyConfig,
    acdc_select,
    fap_signal,
    synergy_prefetch,
    synergy_rerank,
    topk_global,
    topk_per_layer,
)


# ----------------------------------------------------------------------------- score helpers
def fap(ctx: BatchContext, mode: GradientMode | None = None) -> torch.Tensor:
    mode = mode or ctx.cfg.gradient
    return ctx.cached(f"fap:{mode}", lambda: fap_scores(ctx.occ, ctx.grads(mode), ctx.rows, ctx.cfg.corruption))


def factp(ctx: BatchContext) -> torch.Tensor:
    return ctx.cached("factp", lambda: factp_scores(ctx.evaluator))


def _topk(score_fn: Callable[[BatchContext], torch.Tensor], per_layer: bool = False) -> Selector:
    def select(ctx: BatchContext, k: Budget, seed: int, params: MethodParams) -> tuple[torch.Tensor, torch.Tensor]:
        s = score_fn(ctx)
        if per_layer:
            return topk_per_layer(ctx.occ, s, k), s
        return topk_global(ctx.occ, s, k, ctx.synergy.ranks), s  # ranked once per batch and score

    return select


def _synergy(ctx: BatchContext, k: Budget, seed: int, params: MethodParams) -> tuple[torch.Tensor, torch.Tensor]:
    s = fap(ctx)
    cfg = SynergyConfig(**{**params.synergy.__dict__, "seed": seed})
    keep = cast(torch.Tensor, synergy_rerank(ctx.evaluator, s, k, cfg, cache=ctx.synergy))  # return_trace=False
    return keep, s


def _synergy_prefetch(ctx: BatchContext, ks: list[Budget], seed: int, params: MethodParams) -> None:
    """The single and pair removals of every budget in two rounds of forwards (then each K's rerank runs none)."""
    cfg = SynergyConfig(**{**params.synergy.__dict__, "seed": seed})
    synergy_prefetch(ctx.evaluator, fap(ctx), ks, cfg, cache=ctx.synergy)


def _signal(ctx: BatchContext, k: Budget, seed: int, params: MethodParams) -> tuple[torch.Tensor, torch.Tensor]:
    s = fap(ctx)
    return fap_signal(ctx.occ, s, k, params.signal_gamma), s


def _random(ctx: BatchContext, k: Budget, seed: int, params: MethodParams) -> tuple[torch.Tensor, torch.Tensor]:
    s = ctx.cached(f"random:{seed}", lambda: random_scores(ctx.occ, ctx.batch.prompt_idx, seed))
    return topk_global(ctx.occ, s, k), s


def _acdc(ctx: BatchContext, k: Budget, seed: int, params: MethodParams) -> tuple[torch.Tensor, torch.Tensor]:
    keep = acdc_select(ctx.evaluator, k, tau=params.acdc_tau)
    return keep, factp(ctx)


register_method("fap", _topk(lambda c: fap(c)), False, "FAP: |Δa · W_dec · replacement gradient|, top-K global")
register_method("fap-per-layer", _topk(lambda c: fap(c), per_layer=True), False, "FAP with a per-layer budget of K")
register_method("fap-full", _topk(lambda c: fap(c, "full")), False, "FAP with the true model gradient")
register_method(
    "fap-synergy",
    _synergy,
    True,
    "FAP + synergy-aware boundary reranking (seeded partner draws)",
    prefetch=_synergy_prefetch,
)
register_method("fap-signal", _signal, False, "FAP-Signal(γ): signed floors of positive and negative occurrences")
register_method("clt-relp", _topk(lambda c: fap(c, "relp")), False, "CLT-RelP: LRP relevance through the MLPs")
register_method(
    "act-mag", _topk(lambda c: activation_magnitude(c.occ, "clean")), False, "Activation-Magnitude |a_clean|"
)
register_method(
    "act-mag-delta", _topk(lambda c: activation_magnitude(c.occ, "delta")), False, "Activation-Magnitude |Δa|"
)
register_method("random", _random, True, "Uniform random sample of the active set (seeded)")
register_method("factp", _topk(factp), False, "FActP (our reading): exact single-occurrence patching effect")
register_method("acdc", _acdc, False, "ACDC-style greedy pruning on exact patching effects")
