"""Selectors: from scores to a per-prompt circuit of K occurrences (spec §2.7, §4, §5, §6).

All selectors work on every prompt of a batch at once and return a keep mask ``[N]`` over the
batch's occurrences. Ties are broken by occurrence order (layer, position, feature) through
stable sorts, so selections are deterministic.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from pie_lib.engine.precision import float32_weights, runs_in_float32
from pie_lib.errors import BudgetError
from pie_lib.prune.config import SynergyConfig  # noqa: F401 (re-exported: its old home)
from pie_lib.prune.occurrences import Occurrences
from pie_lib.prune.patching import PatchEvaluator, Variants


def rank_within(groups: torch.Tensor, key: torch.Tensor | list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank of every element inside its group by descending ``key`` (stable: ties keep index order).

    Args:
        groups: ``[N]`` int group id (prompt, or prompt*L + layer).
        key: ``[N]``, or a list of ``[N]`` keys, most significant first (lexicographic).
    Returns:
        (order ``[N]``: indices sorted by (group, -key); rank ``[N]``: 0 = best in its group).
    """
    keys = key if isinstance(key, list) else [key]
    n = groups.numel()
    if n == 0:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    order = torch.arange(n)
    for k in reversed(keys):  # least significant first; each stable sort keeps the earlier order
        order = order[torch.argsort(-k.double()[order], stable=True)]
    order = order[torch.argsort(groups[order], stable=True)]
    sorted_groups = groups[order]
    first = torch.ones(n, dtype=torch.bool)
    first[1:] = sorted_groups[1:] != sorted_groups[:-1]
    starts = torch.cummax(torch.where(first, torch.arange(n), torch.zeros(n, dtype=torch.long)), 0).values
    rank = torch.empty(n, dtype=torch.long)
    rank[order] = torch.arange(n) - starts
    return order, rank


@dataclass
class RankCache:
    """:func:`rank_within` by prompt of ``|scores|``, once per score tensor of a batch: FAP's top-K and
    FAP-Synergy's plans at every K rank the same scores. A hit needs the same tensor object, unmodified
    since (its version counter); it is kept here, so its id cannot be reused. One per batch (one ``occ``)."""

    _memo: dict[int, tuple[torch.Tensor, int, torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def by_prompt(self, occ: Occurrences, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(order, rank) of ``rank_within(occ.prompt, scores.abs())``."""
        hit = self._memo.get(id(scores))
        if hit is not None and hit[0] is scores and hit[1] == scores._version:
            return hit[2], hit[3]
        order, rank = rank_within(occ.prompt.cpu(), scores.abs())
        self._memo[id(scores)] = (scores, scores._version, order, rank)
        return order, rank


Budget = int | torch.Tensor  # one K for every prompt, or ``[B]`` per prompt (fraction ladders)


def check_budget(k: Budget) -> None:
    if isinstance(k, torch.Tensor):
        if k.dtype not in (torch.int32, torch.int64) or (k <= 0).any():
            raise BudgetError(f"per-prompt budgets must be positive integers, got {k.tolist()}")
        return
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
        raise BudgetError(f"budget K={k!r} must be a positive integer (occurrences kept per prompt)")


def budget_per_prompt(k: Budget, n_prompts: int) -> torch.Tensor:
    """``[B]`` budget of each prompt."""
    check_budget(k)
    return k.cpu().long() if isinstance(k, torch.Tensor) else torch.full((n_prompts,), int(k), dtype=torch.long)


def topk_global(occ: Occurrences, scores: torch.Tensor, k: Budget, ranks: RankCache | None = None) -> torch.Tensor:
    """Keep the top-K occurrences of each prompt by |score| (K clipped to the active set); ``ranks``:
    the batch's ranking cache (the ranking is the same at every K)."""
    kv = budget_per_prompt(k, occ.n_prompts)
    _, rank = (ranks or RankCache()).by_prompt(occ, scores)
    return rank < kv[occ.prompt.cpu()]


def topk_per_layer(occ: Occurrences, scores: torch.Tensor, k: Budget) -> torch.Tensor:
    """Per-layer budget variant: the top-K by |score| within each (prompt, source layer)."""
    kv = budget_per_prompt(k, occ.n_prompts)
    groups = occ.prompt.cpu() * (int(occ.layer.max()) + 1 if len(occ) else 1) + occ.layer.cpu()
    _, rank = rank_within(groups, scores.abs())
    return rank < kv[occ.prompt.cpu()]


def fap_signal(occ: Occurrences, scores: torch.Tensor, k: Budget, gamma: float = 0.2) -> torch.Tensor:
    """FAP-Signal(γ): floor(γK) strongest positive, floor(γK) strongest negative, rest by |S|.

    Preserves a signed floor of inhibitory features (spec §5). γ must lie in (0, 0.5).
    """
    kv = budget_per_prompt(k, occ.n_prompts)
    if not 0 < gamma < 0.5:
        raise BudgetError(f"FAP-Signal gamma={gamma} must be in (0, 0.5)")
    prompt = occ.prompt.cpu()
    n_sign = torch.floor(gamma * kv.double()).long()[prompt]
    neg_inf = torch.tensor(float("-inf"))
    _, r_pos = rank_within(prompt, torch.where(scores > 0, scores, neg_inf))
    _, r_neg = rank_within(prompt, torch.where(scores < 0, -scores, neg_inf))
    keep = ((scores > 0) & (r_pos < n_sign)) | ((scores < 0) & (r_neg < n_sign))
    counts = occ.counts().cpu()
    budget = torch.minimum(counts, kv)
    taken = torch.bincount(prompt[keep], minlength=occ.n_prompts)
    _, r_rest = rank_within(prompt, torch.where(keep, neg_inf, scores.abs()))
    keep |= (~keep) & (r_rest < (budget - taken)[prompt])
    return keep


@dataclass
class SynergyTrace:
    """What the rerank did, per prompt (for tests and notebooks)."""

    core: list[list[int]]
    boundary: list[list[int]]
    boosted: list[list[float]]
    n_forwards: int


@dataclass
class SynergyEffects:
    """The M(.) effects one batch has paid for, in one precision of the forwards.

    Attributes:
        single: ``[N]`` ``M({i}) = m_clean - m({i} removed)``; NaN = not computed yet.
        pairs: ``Syn(c, p) = M({c, p}) - M({c}) - M({p})`` of the pairs computed so far.
        m_clean: the clean metric of this precision (None: the evaluator's own; float32 upcasts keep theirs).
        states: while the pairs that need them run, the evaluator's kept state of single removals.
    """

    single: torch.Tensor
    pairs: dict[tuple[int, int], float] = field(default_factory=dict)
    m_clean: torch.Tensor | None = None
    states: dict[int, int] = field(default_factory=dict)  # occurrence -> its single forward's kept state id


@dataclass
class SynergyCache:
    """Effect caches of one batch, per precision (a :class:`~pie_lib.prune.context.BatchContext` owns one,
    so a K ladder over the same prompts pays for each single and pair removal once)."""

    by_precision: dict[str, SynergyEffects] = field(default_factory=dict)
    ranks: RankCache = field(default_factory=RankCache)  # the scores' order within each prompt

    def effects(self, precision: str, n: int) -> SynergyEffects:
        e = self.by_precision.get(precision)
        if e is None or e.single.numel() != n:
            e = self.by_precision[precision] = SynergyEffects(torch.full((n,), float("nan")))
        return e


@dataclass(frozen=True)
class BoundaryPlan:
    """One prompt's reranking plan (spec §4).

    Attributes:
        order: ``[n]`` the prompt's occurrences by descending |S|; K: its budget (clipped to n).
        core_k: ``K - half`` kept outright; boundary: ``[<= boundary_cap]`` candidates
            ``order[core_k : K + half]``; partners: ``[<= partners]`` the top of the core.
        base_scale: the lower median |S| of the top K (the score normaliser).
        forced: the boundary fits the free slots, so the selection is plain top-K (no forwards).
    """

    order: torch.Tensor
    K: int
    core_k: int
    boundary: torch.Tensor
    partners: torch.Tensor
    base_scale: float
    forced: bool


def plan_boundaries(
    occ: Occurrences, s_abs: torch.Tensor, kv: torch.Tensor, cfg: SynergyConfig, order: torch.Tensor | None = None
) -> list[BoundaryPlan | None]:
    """Step 1: per prompt, its core, boundary candidates and partners (None: no active occurrence).

    ``order``: ``rank_within(occ.prompt, s_abs)``'s order, when the caller has it already."""
    if order is None:
        order, _ = rank_within(occ.prompt.cpu(), s_abs)
    starts = occ.offsets().cpu()
    plans: list[BoundaryPlan | None] = []
    for b in range(occ.n_prompts):
        ob = order[starts[b] : starts[b + 1]]
        n = ob.numel()
        if n == 0:
            plans.append(None)
            continue
        K = min(int(kv[b]), n)
        half = int(round(cfg.boundary_percent / 100.0 * K * 0.5))
        core_k = max(0, K - half)
        boundary = ob[core_k : min(n, K + half)][: cfg.boundary_cap]
        # torch.median is the lower median (as in the reference); np.median averages (also as there)
        base_scale = max(float(s_abs[ob[:K]].median()), 1e-6)
        # a boundary no longer than the free slots keeps every candidate whatever its boosted score:
        # plain top-K, no forwards (K >= 400 at the paper's settings), and no generator draw matters
        forced = boundary.numel() <= K - core_k
        plans.append(BoundaryPlan(ob, K, core_k, boundary, ob[: min(cfg.partners, core_k)], base_scale, forced))
    return plans


def median(values: list[float]) -> float:
    """``float(np.median(values))`` of a non-empty list of floats, bit for bit: the middle value, or the
    mean ``(a + b) / 2`` of the two middle ones; NaN if any value is NaN. (np.median's first call
    imports ``numpy.ma``, ~0.14 s of every FAP-Synergy run.)"""
    if any(math.isnan(v) for v in values):
        return math.nan
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def single_effects(
    evaluator: PatchEvaluator,
    plans: list[BoundaryPlan | None],
    effects: SynergyEffects,
    m_clean: torch.Tensor,
    retain: torch.Tensor | None = None,
) -> torch.Tensor:
    """Step 2: ``[N]`` single effects M({i}) of the partners and candidates (one batched round of
    forwards for those not cached; zero-write occurrences have no effect and need none).

    ``retain``: ``[N]`` bool, singles whose forwards' keys and values the evaluator keeps
    (:meth:`PatchEvaluator.run` ``retain``); their state ids go into ``effects.states``.
    """
    delta, cache = evaluator.delta.cpu(), effects.single
    prompt = evaluator.occ.prompt.cpu()
    need = [torch.cat([p.partners, p.boundary]) for p in plans if p and not p.forced]
    singles = torch.unique(torch.cat(need)) if need else torch.zeros(0, dtype=torch.long)
    singles = singles[(delta[singles] != 0) & torch.isnan(cache[singles])]
    if singles.numel():
        keep = retain[singles] if retain is not None else None
        variants = Variants.singles(prompt[singles], singles)
        res = evaluator.run(variants, retain=keep) if keep is not None and bool(keep.any()) else evaluator.run(variants)
        cache[singles] = m_clean[prompt[singles]] - res.metric
        state = getattr(res, "state", None)
        if state is not None:
            got = state >= 0
            effects.states.update(zip(singles[got].tolist(), state[got].tolist()))
    return torch.nan_to_num(cache, nan=0.0)


PartnerDraws = list[list[list[int] | None]]  # per prompt, per boundary candidate: its partners (None: no draw)


def draw_partners(
    plans: list[BoundaryPlan | None], delta: torch.Tensor, eff: torch.Tensor, cfg: SynergyConfig
) -> tuple[PartnerDraws, list[tuple[int, int]]]:
    """Step 3: partner draws exactly as the reference consumes its generator -- one
    ``random.Random(seed + 1337)`` per prompt, candidates in boundary order, a draw only for a
    candidate with a nonzero write -- and the (candidate, partner) pairs whose synergy is needed
    (both single effects above ``cfg.eff_tol``)."""
    draws: PartnerDraws = []
    pairs: list[tuple[int, int]] = []
    # plain Python values once, not one tensor read per candidate; `above` compares in eff's dtype, as before
    delta_l, above = delta.tolist(), (eff > cfg.eff_tol).tolist()
    for p in plans:
        if p is None or p.forced:
            draws.append([])
            continue
        rng = random.Random(cfg.seed + 1337)
        partners = p.partners.tolist()
        n_part = len(partners)
        per_cand: list[list[int] | None] = []
        for c in p.boundary.tolist():
            if delta_l[c] == 0 or n_part == 0:
                per_cand.append(None)
                continue
            idxs = rng.sample(range(n_part), min(cfg.partners_per_candidate, n_part))
            mates = [partners[i] for i in idxs]
            per_cand.append(mates)
            pairs += [(c, m) for m in mates if above[m] and above[c]]
        draws.append(per_cand)
    return draws, pairs


def pair_synergies(
    evaluator: PatchEvaluator,
    pairs: list[tuple[int, int]],
    eff: torch.Tensor,
    effects: SynergyEffects,
    m_clean: torch.Tensor,
) -> dict[tuple[int, int], float]:
    """Step 4: ``Syn(c, p)`` of every needed pair (one batched round of pair removals for those not cached).

    A pair whose members sit at different positions starts, where the earlier member's single
    forward was kept (``effects.states``), from that forward at the later member's position.
    """
    prompt = evaluator.occ.prompt.cpu()
    todo = sorted({t for t in pairs if t not in effects.pairs})
    if todo:
        pc, pp = torch.tensor([t[0] for t in todo]), torch.tensor([t[1] for t in todo])
        V = pc.numel()
        var = torch.arange(V).repeat_interleave(2)
        ent = torch.stack([pc, pp], 1).flatten()
        parent = None
        if effects.states:
            pos = evaluator.occ.pos.cpu()
            earlier = torch.where(pos[pc] <= pos[pp], pc, pp)
            parent = torch.tensor([effects.states.get(int(o), -1) for o in earlier.tolist()], dtype=torch.long)
        res = evaluator.run(Variants(prompt[pc], var, ent, torch.zeros(V, dtype=torch.bool), parent=parent))
        syn = (m_clean[prompt[pc]] - res.metric) - eff[pc] - eff[pp]
        effects.pairs.update({t: float(v) for t, v in zip(todo, syn.tolist())})
    return effects.pairs


def rerank_boundaries(
    plans: list[BoundaryPlan | None],
    draws: PartnerDraws,
    eff: torch.Tensor,
    syn: dict[tuple[int, int], float],
    s_abs: torch.Tensor,
    cfg: SynergyConfig,
) -> tuple[torch.Tensor, SynergyTrace]:
    """Step 5: keep the core, the best boundary candidates by
    ``|S_c| / base_scale + λ · max(0, median Syn) / med_partner``, and fill any shortfall in |S| order."""
    keep = torch.zeros(s_abs.numel(), dtype=torch.bool)
    trace = SynergyTrace([], [], [], 0)
    eff_l, s_abs_l = eff.tolist(), s_abs.tolist()  # the same floats as float(eff[i]), read once
    for b, p in enumerate(plans):
        if p is None:
            for lst in (trace.core, trace.boundary, trace.boosted):
                lst.append([])
            continue
        trace.core.append(p.order[: p.core_k].tolist())
        trace.boundary.append(p.boundary.tolist())
        if p.forced:
            keep[p.order[: p.K]] = True
            trace.boosted.append([])
            continue
        keep[p.order[: p.core_k]] = True
        part_eff = [eff_l[i] for i in p.partners.tolist()]
        med_partner = max(median([abs(e) for e in part_eff]) if part_eff else 1.0, 1e-6)
        cands = []
        for j, c in enumerate(p.boundary.tolist()):
            base_z = s_abs_l[c] / p.base_scale
            mates = draws[b][j]
            if mates is None:
                cands.append((base_z, c))
                continue
            vals = [syn[(c, m)] for m in mates if (c, m) in syn]
            syn_stat = median(vals) if vals else 0.0
            cands.append((base_z + cfg.lam * max(0.0, syn_stat) / (med_partner + 1e-6), c))
        ranked = sorted(cands, key=lambda x: -x[0])  # stable, like the reference
        for _, c in ranked[: p.K - p.core_k]:
            keep[c] = True
        short = p.K - int(keep[p.order].sum())
        if short > 0:
            rest = p.order[~keep[p.order]]
            keep[rest[:short]] = True
        trace.boosted.append([s for s, _ in cands])
    return keep, trace


def synergy_rerank(
    evaluator: PatchEvaluator,
    scores: torch.Tensor,
    k: Budget,
    cfg: SynergyConfig = SynergyConfig(),
    return_trace: bool = False,
    cache: SynergyCache | None = None,
) -> torch.Tensor | tuple[torch.Tensor, SynergyTrace]:
    """FAP-Synergy boundary reranking (spec §4), every prompt of the batch at once.

    ``M(S) = m_clean - m(S removed)``; ``Syn(c, p) = M({c, p}) - M({c}) - M({p})``. The steps:
    :func:`plan_boundaries` (core, boundary, partners per prompt) -> :func:`single_effects` ->
    :func:`draw_partners` -> :func:`pair_synergies` -> :func:`rerank_boundaries`. All single and
    pair removals of all prompts run as two batched rounds of forwards.

    ``cfg.precision="float32"`` (default) runs every M(.) forward in float32 whatever the model's
    dtype (:func:`float32_synergy`); ``"model"`` keeps the model's dtype, as the reference does
    (bf16 autocast). ``cfg.eff_tol`` is the noise tolerance of the ``eff > 0`` filters.

    Args:
        evaluator: patches the batch; scores: ``[N]`` FAP scores; k: budget.
        cache: the batch's effect caches (default: a fresh one, nothing reused across calls).
    Returns:
        keep mask ``[N]`` (and a :class:`SynergyTrace` with ``return_trace``).
    """
    cache = SynergyCache() if cache is None else cache
    with _synergy_effects(evaluator, cfg, cache) as effects:
        return _rerank(evaluator, scores, k, cfg, effects, return_trace, cache.ranks)


def synergy_prefetch(
    evaluator: PatchEvaluator,
    scores: torch.Tensor,
    ks: list[Budget],
    cfg: SynergyConfig = SynergyConfig(),
    cache: SynergyCache | None = None,
) -> None:
    """Pay, into ``cache``, for every single and pair removal that :func:`synergy_rerank` needs at each
    budget of ``ks``: the singles of all budgets in one batched round of forwards, then their pairs in
    another, instead of two rounds per budget. The reranks that follow (same scores, budgets, ``cfg``
    and cache) then run no forward and select what they would have selected alone: a budget's plan,
    partner draws and pairs are its own, and only the forwards are shared.
    """
    cache = SynergyCache() if cache is None else cache
    with _synergy_effects(evaluator, cfg, cache) as effects:
        occ = evaluator.occ
        s_abs = scores.abs()
        order, _ = cache.ranks.by_prompt(occ, scores)
        plans = [plan_boundaries(occ, s_abs, budget_per_prompt(k, occ.n_prompts), cfg, order) for k in ks]
        m_clean = evaluator.clean_metric()
        _effects_and_synergies(evaluator, [p for per_k in plans for p in per_k], effects, m_clean, cfg)


def _effects_and_synergies(
    evaluator: PatchEvaluator,
    plans: list[BoundaryPlan | None],
    effects: SynergyEffects,
    m_clean: torch.Tensor,
    cfg: SynergyConfig,
) -> tuple[torch.Tensor, PartnerDraws, dict[tuple[int, int], float]]:
    """Steps 2-4 for ``plans`` (one or several budgets'): single effects, partner draws, pair synergies.

    The draws do not depend on the single effects (only which pairs are kept does), so the pairs any
    draw can ask for are known before the singles run; the single forward of each pair's earlier
    member is kept, and the pair starts from it at its later member's position (exact: before that
    position the pair removes what the single does). The kept states are released at the end.
    """
    delta = evaluator.delta.cpu()
    everything = torch.full((delta.numel(),), float("inf"))
    candidates = draw_partners(plans, delta, everything, cfg)[1]
    retain = None
    if candidates:
        pos = evaluator.occ.pos.cpu()
        pc, pp = torch.tensor([t[0] for t in candidates]), torch.tensor([t[1] for t in candidates])
        apart = pos[pc] != pos[pp]
        retain = torch.zeros(delta.numel(), dtype=torch.bool)
        retain[torch.where(pos[pc] < pos[pp], pc, pp)[apart]] = True
    try:
        eff = single_effects(evaluator, plans, effects, m_clean, retain)
        draws, pairs = draw_partners(plans, delta, eff, cfg)
        syn = pair_synergies(evaluator, pairs, eff, effects, m_clean)
    finally:
        effects.states.clear()
        release = getattr(evaluator, "release_states", None)  # stand-in evaluators of tests have none
        if release is not None:
            release()
    return eff, draws, syn


@contextmanager
def _synergy_effects(evaluator: PatchEvaluator, cfg: SynergyConfig, cache: SynergyCache) -> Iterator[SynergyEffects]:
    """The effect cache of the precision ``cfg`` asks for, with the evaluator's forwards in it."""
    n = len(evaluator.occ)
    model = getattr(evaluator, "model", None)  # None: a stand-in evaluator without a model (tests)
    if cfg.precision == "float32" and model is not None and not runs_in_float32(model):
        effects = cache.effects("float32-upcast", n)
        with float32_synergy(evaluator, effects):  # the same rerank, its forwards now in float32
            yield effects
        return
    yield cache.effects("model", n)


def _rerank(
    evaluator: PatchEvaluator,
    scores: torch.Tensor,
    k: Budget,
    cfg: SynergyConfig,
    effects: SynergyEffects,
    return_trace: bool,
    ranks: RankCache,
) -> torch.Tensor | tuple[torch.Tensor, SynergyTrace]:
    occ = evaluator.occ
    n_before = evaluator.n_forwards
    s_abs = scores.abs()
    order, _ = ranks.by_prompt(occ, scores)
    plans = plan_boundaries(occ, s_abs, budget_per_prompt(k, occ.n_prompts), cfg, order)
    m_clean = evaluator.clean_metric()
    eff, draws, syn = _effects_and_synergies(evaluator, plans, effects, m_clean, cfg)
    keep, trace = rerank_boundaries(plans, draws, eff, syn, s_abs, cfg)
    trace.n_forwards = evaluator.n_forwards - n_before
    return (keep, trace) if return_trace else keep


@contextmanager
def float32_synergy(evaluator: PatchEvaluator, effects: SynergyEffects) -> Iterator[None]:
    """Inside the block ``evaluator``'s forwards run in float32 (:func:`~pie_lib.engine.precision.float32_weights`)
    against the float32 clean metric kept in ``effects`` (computed on first use), so
    ``M(S) = m_clean - m(S removed)`` is float32 end to end; the model-dtype clean metric is restored after."""
    m_clean = evaluator.m_clean
    with float32_weights(evaluator.model):
        evaluator.m_clean = effects.m_clean  # None: clean_metric() runs the zero-offset forward, in float32
        try:
            yield
        finally:
            effects.m_clean = evaluator.m_clean
            evaluator.m_clean = m_clean


def acdc_select(
    evaluator: PatchEvaluator, k: Budget, tau: float | None = None, step_fraction: float = 0.5, max_rounds: int = 64
) -> torch.Tensor:
    """ACDC-style greedy pruning on exact patching effects (the v1 baseline), budgeted to K.

    Start from every active occurrence kept. Each round measures, with batched forwards, how much
    removing each still-kept occurrence *on top of the current removals* raises KL(clean || patched);
    occurrences whose increase is below ``tau`` are removed (ACDC's threshold rule), and when a
    threshold removes too few, the ``step_fraction`` of the surplus with the smallest increases
    goes instead. Stops at exactly min(K, n_active) kept per prompt.
    """
    occ = evaluator.occ
    kv = budget_per_prompt(k, occ.n_prompts)
    prompt = occ.prompt.cpu()
    keep = torch.ones(len(occ), dtype=torch.bool)
    target = torch.minimum(occ.counts().cpu(), kv)
    for _ in range(max_rounds):
        n_keep = torch.bincount(prompt[keep], minlength=occ.n_prompts)
        surplus = n_keep - target
        if int(surplus.max()) <= 0:
            break
        active_prompts = surplus > 0
        cand = (keep & active_prompts[prompt]).nonzero().squeeze(-1)
        # current state: removed = ~keep; its offsets per prompt, then + each single candidate
        removed_now = Variants.from_sets(
            torch.arange(occ.n_prompts),
            (~keep)[None].expand(occ.n_prompts, -1) & (prompt[None] == torch.arange(occ.n_prompts)[:, None]),
            complement=False,
        )
        base = evaluator.run(removed_now)
        base_off = evaluator.offsets(removed_now.var, removed_now.occ, None, occ.n_prompts)
        res = evaluator.run(Variants.singles(prompt[cand], cand), extra_offsets=base_off)
        inc = res.kl - base.kl[prompt[cand]]
        _, r = rank_within(prompt[cand], -inc)  # rank 0 = smallest increase
        n_drop = torch.ceil(surplus.clamp_min(0) * step_fraction).long().clamp_min(1)
        drop = r < torch.minimum(n_drop, surplus.clamp_min(0))[prompt[cand]]
        if tau is not None:
            under = inc < tau
            # the threshold may remove more, but never past the budget
            _, r_all = rank_within(prompt[cand], torch.where(under, -inc, torch.tensor(float("-inf"))))
            drop |= under & (r_all < surplus[prompt[cand]])
        keep[cand[drop]] = False
    return keep
