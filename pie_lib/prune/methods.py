"""The method registry: a name on the command line -> how to score and select a K-circuit.

Each method maps (batch context, K, seed) to a keep mask ``[N]`` and the per-occurrence scores
recorded with the selection. Related methods (Edge Pruning, HAP, ensembles...) register
themselves here too, so ``pie prune --methods`` and the sweep store see one list.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from pie_lib.errors import BudgetError
from pie_lib.prune.context import BatchContext
from pie_lib.prune.scores import activation_magnitude, factp_scores, fap_scores, random_scores
from pie_lib.prune.select import SynergyConfig, acdc_select, fap_signal, synergy_rerank, topk_global, topk_per_layer


@dataclass
class MethodParams:
    """Hyper-parameters of the methods (paper defaults). Fields are CLI flags of ``pie prune``."""

    synergy: SynergyConfig = field(default_factory=SynergyConfig)
    signal_gamma: float = 0.2
    acdc_tau: float | None = None
    extra: dict = field(default_factory=dict)  # hyper-parameters of registered related methods


Selector = Callable[[BatchContext, int, int, MethodParams], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Method:
    """A circuit-discovery method. ``seeded``: its selection depends on the seed."""

    name: str
    select: Selector
    seeded: bool
    description: str


METHODS: dict[str, Method] = {}


def register_method(name: str, select: Selector, seeded: bool, description: str) -> None:
    """Add a method to the registry (used by pie_lib.related for Edge Pruning, HAP, ensembles)."""
    METHODS[name] = Method(name, select, seeded, description)


def get_methods(names: list[str] | str) -> list[Method]:
    """Resolve a comma list of names; unknown, empty or duplicate lists are clear errors."""
    _load_related()
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    if not names:
        raise BudgetError(f"no methods given; choose from {sorted(METHODS)}")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise BudgetError(f"method(s) {dup} listed twice; list each method once")
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise BudgetError(f"unknown method(s) {unknown}; choose from {sorted(METHODS)}")
    return [METHODS[n] for n in names]


def _load_related() -> None:
    """Import the related-methods package if present so it can register its methods."""
    try:
        import pie_lib.related  # noqa: F401
    except ImportError:
        pass


# ----------------------------------------------------------------------------- score helpers
def fap(ctx: BatchContext, mode: str | None = None) -> torch.Tensor:
    mode = mode or ctx.cfg.gradient
    return ctx.cached(f"fap:{mode}", lambda: fap_scores(ctx.occ, ctx.grads(mode), ctx.rows, ctx.cfg.corruption))


def factp(ctx: BatchContext) -> torch.Tensor:
    return ctx.cached("factp", lambda: factp_scores(ctx.evaluator))


def _topk(score_fn: Callable[[BatchContext], torch.Tensor], per_layer: bool = False) -> Selector:
    def select(ctx: BatchContext, k: int, seed: int, params: MethodParams) -> tuple[torch.Tensor, torch.Tensor]:
        s = score_fn(ctx)
        return (topk_per_layer if per_layer else topk_global)(ctx.occ, s, k), s

    return select


def _synergy(ctx: BatchContext, k: int, seed: int, params: MethodParams) -> tuple[torch.Tensor, torch.Tensor]:
    s = fap(ctx)
    cfg = SynergyConfig(**{**params.synergy.__dict__, "seed": seed})
    return synergy_rerank(ctx.evaluator, s, k, cfg), s


def _signal(ctx: BatchContext, k: int, seed: int, params: MethodParams) -> tuple[torch.Tensor, torch.Tensor]:
    s = fap(ctx)
    return fap_signal(ctx.occ, s, k, params.signal_gamma), s


def _random(ctx: BatchContext, k: int, seed: int, params: MethodParams) -> tuple[torch.Tensor, torch.Tensor]:
    s = ctx.cached(f"random:{seed}", lambda: random_scores(ctx.occ, ctx.batch.prompt_idx, seed))
    return topk_global(ctx.occ, s, k), s


def _acdc(ctx: BatchContext, k: int, seed: int, params: MethodParams) -> tuple[torch.Tensor, torch.Tensor]:
    keep = acdc_select(ctx.evaluator, k, tau=params.acdc_tau)
    return keep, factp(ctx)


register_method("fap", _topk(lambda c: fap(c)), False, "FAP: |Δa · W_dec · replacement gradient|, top-K global")
register_method("fap-per-layer", _topk(lambda c: fap(c), per_layer=True), False, "FAP with a per-layer budget of K")
register_method("fap-full", _topk(lambda c: fap(c, "full")), False, "FAP with the true model gradient")
register_method("fap-synergy", _synergy, True, "FAP + synergy-aware boundary reranking (seeded partner draws)")
register_method("fap-signal", _signal, False, "FAP-Signal(γ): signed floors of positive and negative occurrences")
register_method("clt-relp", _topk(lambda c: fap(c, "relp")), False, "CLT-RelP: LRP relevance through the MLPs")
register_method("act-mag", _topk(lambda c: activation_magnitude(c.occ, "clean")), False, "Activation-Magnitude |a_clean|")
register_method("act-mag-delta", _topk(lambda c: activation_magnitude(c.occ, "delta")), False, "Activation-Magnitude |Δa|")
register_method("random", _random, True, "Uniform random sample of the active set (seeded)")
register_method("factp", _topk(factp), False, "FActP (our reading): exact single-occurrence patching effect")
register_method("acdc", _acdc, False, "ACDC-style greedy pruning on exact patching effects")
