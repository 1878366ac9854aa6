"""Selectors: from scores to a per-prompt circuit of K occurrences (spec §2.7, §4, §5, §6).

All selectors work on every prompt of a batch at once and return a keep mask ``[N]`` over the
batch's occurrences. Ties are broken by occurrence order (layer, position, feature) through
stable sorts, so selections are deterministic.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import numpy as np
import torch

from pie_lib.engine.precision import float32_weights, runs_in_float32
from pie_lib.errors import BudgetError, SettingError
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


def topk_global(occ: Occurrences, scores: torch.Tensor, k: Budget) -> torch.Tensor:
    """Keep the top-K occurrences of each prompt by |score| (K clipped to the active set)."""
    kv = budget_per_prompt(k, occ.n_prompts)
    _, rank = rank_within(occ.prompt.cpu(), scores.abs())
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
class SynergyConfig:
    """FAP-Synergy parameters; defaults are the paper's (reference script: λ=5, bp=50)."""

    lam: float = 3.0
    boundary_percent: float = 25.0
    boundary_cap: int = 32
    partners: int = 32
    partners_per_candidate: int = 8
    seed: int = 0
    #: dtype of the M(.) forwards: "float32" whatever the model's dtype (a bfloat16 model is upcast
    #: for the reranking and restored exactly after), or "model" (the reference's reduced precision).
    precision: str = "float32"
    #: a synergy Syn(c, p) is used only where both single effects exceed this (0 = the paper's "> 0");
    #: a noise tolerance for M(.) in reduced precision.
    eff_tol: float = 0.0

    def __post_init__(self) -> None:
        if self.precision not in ("float32", "model"):
            raise SettingError(f"--synergy-precision {self.precision!r}: use 'float32' or 'model'")
        if not self.eff_tol >= 0:
            raise SettingError(f"--synergy-eff-tol {self.eff_tol}: must be >= 0")


@dataclass
class SynergyTrace:
    """What the rerank did, per prompt (for tests and notebooks)."""

    core: list[list[int]]
    boundary: list[list[int]]
    boosted: list[list[float]]
    n_forwards: int


def synergy_rerank(
    evaluator: PatchEvaluator,
    scores: torch.Tensor,
    k: Budget,
    cfg: SynergyConfig = SynergyConfig(),
    return_trace: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, SynergyTrace]:
    """FAP-Synergy boundary reranking (spec §4), every prompt of the batch at once.

    ``M(S) = m_clean - m(S removed)``; ``Syn(c, p) = M({c, p}) - M({c}) - M({p})``.
    Core = the top ``K' - half`` by |S|; the boundary ``order[K'-half : K'+half]`` (first
    ``boundary_cap``) is reranked by ``|S_c| / base_scale + λ · max(0, median Syn) / med_partner``
    and the best ``half`` are kept; any shortfall is filled in |S| order. Partner draws follow the
    reference exactly: one ``random.Random(seed + 1337)`` per prompt, candidates in boundary order,
    a draw only for candidates with a nonzero write. All single and pair removals of all prompts run
    as two batched rounds of forwards.

    ``cfg.precision="float32"`` (default) runs every M(.) forward in float32 whatever the model's
    dtype (:func:`float32_synergy`); ``"model"`` keeps the model's dtype, as the reference does
    (bf16 autocast). ``cfg.eff_tol`` is the noise tolerance of the ``eff > 0`` filters.

    Args:
        evaluator: patches the batch; scores: ``[N]`` FAP scores; k: budget.
    Returns:
        keep mask ``[N]`` (and a :class:`SynergyTrace` with ``return_trace``).
    """
    model = getattr(evaluator, "model", None)  # None: a stand-in evaluator without a model (tests)
    if cfg.precision == "float32" and model is not None and not runs_in_float32(model):
        with float32_synergy(evaluator):  # the same rerank, its forwards now in float32
            return synergy_rerank(evaluator, scores, k, replace(cfg, precision="model"), return_trace)
    occ = evaluator.occ
    kv = budget_per_prompt(k, occ.n_prompts)
    prompt = occ.prompt.cpu()
    order, _ = rank_within(prompt, scores.abs())
    starts = occ.offsets().cpu()
    delta = evaluator.delta.cpu()
    s_abs = scores.abs()
    keep = torch.zeros(len(occ), dtype=torch.bool)
    plans = []
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
        partners = ob[: min(cfg.partners, core_k)]
        base_vals = s_abs[ob[:K]]
        # torch.median is the lower median (as in the reference); np.median averages (also as there)
        base_scale = max(float(base_vals.median()), 1e-6)
        plans.append(
            dict(ob=ob, K=K, half=half, core_k=core_k, boundary=boundary, partners=partners, base_scale=base_scale)
        )

    # A prompt whose boundary is no longer than the number of free slots keeps every candidate
    # whatever its boosted score: its selection is plain top-K and needs no forwards (K >= 400 at
    # the paper's settings). Its generator draws cannot change anything either.
    for p in plans:
        if p is not None:
            p["forced"] = p["boundary"].numel() <= p["K"] - p["core_k"]

    # Round 1: single removals of partners and candidates with a nonzero write. Effects are cached
    # on the evaluator, so a K ladder (same prompts, overlapping partners) pays for each once.
    cache_single = _effect_cache(evaluator, "_synergy_single", len(occ))
    need = [torch.cat([p["partners"], p["boundary"]]) for p in plans if p and not p["forced"]]
    singles = torch.unique(torch.cat(need)) if need else torch.zeros(0, dtype=torch.long)
    singles = singles[(delta[singles] != 0) & torch.isnan(cache_single[singles])]
    m_clean = evaluator.clean_metric()
    if singles.numel():
        res = evaluator.run(Variants.singles(prompt[singles], singles))
        cache_single[singles] = m_clean[prompt[singles]] - res.metric
    eff = torch.nan_to_num(cache_single, nan=0.0)  # zero-write occurrences have no effect

    # Partner draws, per prompt, exactly as the reference consumes its generator.
    pair_c, pair_p, draws = [], [], []
    for b, p in enumerate(plans):
        if p is None or p["forced"]:
            draws.append([])
            continue
        rng = random.Random(cfg.seed + 1337)
        n_part = p["partners"].numel()
        per_cand = []
        for c in p["boundary"].tolist():
            if delta[c] == 0 or n_part == 0:
                per_cand.append(None)
                continue
            idxs = rng.sample(range(n_part), min(cfg.partners_per_candidate, n_part))
            mates = [int(p["partners"][i]) for i in idxs]
            per_cand.append(mates)
            for m in mates:
                if eff[m] > cfg.eff_tol and eff[c] > cfg.eff_tol:
                    pair_c.append(c)
                    pair_p.append(m)
        draws.append(per_cand)

    # Round 2: pair removals M({c, p}), only where both single effects are positive (cached too).
    pair_eff: dict[tuple[int, int], float] = evaluator.__dict__.setdefault("_synergy_pairs", {})
    todo = sorted({(c, q) for c, q in zip(pair_c, pair_p) if (c, q) not in pair_eff})
    if todo:
        pc, pp = torch.tensor([t[0] for t in todo]), torch.tensor([t[1] for t in todo])
        V = pc.numel()
        var = torch.arange(V).repeat_interleave(2)
        ent = torch.stack([pc, pp], 1).flatten()
        res = evaluator.run(Variants(prompt[pc], var, ent, torch.zeros(V, dtype=torch.bool)))
        syn = (m_clean[prompt[pc]] - res.metric) - eff[pc] - eff[pp]
        pair_eff.update({t: float(v) for t, v in zip(todo, syn.tolist())})

    trace = SynergyTrace([], [], [], evaluator.n_forwards)
    for b, p in enumerate(plans):
        if p is None:
            for lst in (trace.core, trace.boundary, trace.boosted):
                lst.append([])
            continue
        if p["forced"]:
            keep[p["ob"][: p["K"]]] = True
            trace.core.append(p["ob"][: p["core_k"]].tolist())
            trace.boundary.append(p["boundary"].tolist())
            trace.boosted.append([])
            continue
        keep[p["ob"][: p["core_k"]]] = True
        part_eff = [float(eff[i]) for i in p["partners"].tolist()]
        med_partner = max(float(np.median(np.abs(part_eff))) if part_eff else 1.0, 1e-6)
        cands = []
        for j, c in enumerate(p["boundary"].tolist()):
            base_z = float(s_abs[c]) / p["base_scale"]
            mates = draws[b][j]
            if mates is None:
                cands.append((base_z, c))
                continue
            vals = [pair_eff[(c, m)] for m in mates if (c, m) in pair_eff]
            syn_stat = float(np.median(vals)) if vals else 0.0
            cands.append((base_z + cfg.lam * max(0.0, syn_stat) / (med_partner + 1e-6), c))
        needed = p["K"] - p["core_k"]
        ranked = sorted(cands, key=lambda x: -x[0])  # stable, like the reference
        for _, c in ranked[:needed]:
            keep[c] = True
        short = p["K"] - int(keep[p["ob"]].sum())
        if short > 0:
            rest = p["ob"][~keep[p["ob"]]]
            keep[rest[:short]] = True
        trace.core.append(p["ob"][: p["core_k"]].tolist())
        trace.boundary.append(p["boundary"].tolist())
        trace.boosted.append([s for s, _ in cands])
    trace.n_forwards = evaluator.n_forwards - trace.n_forwards
    return (keep, trace) if return_trace else keep


_SYNERGY_CACHES = ("_synergy_single", "_synergy_pairs")


@contextmanager
def float32_synergy(evaluator: PatchEvaluator) -> Iterator[None]:
    """Inside the block ``evaluator``'s forwards run in float32 (:func:`~pie_lib.engine.precision.float32_weights`)
    against a float32 clean metric, with effect caches of their own (kept across calls, apart from
    the model-dtype ones), so ``M(S) = m_clean - m(S removed)`` is float32 end to end."""
    mine = evaluator.__dict__.pop("_synergy_float32", {})
    saved = {key: evaluator.__dict__.pop(key) for key in _SYNERGY_CACHES if key in evaluator.__dict__}
    evaluator.__dict__.update(mine.get("caches", {}))
    m_clean = evaluator.m_clean
    with float32_weights(evaluator.model):
        evaluator.m_clean = mine.get("m_clean")  # None: clean_metric() runs the zero-offset forward, in float32
        try:
            yield
        finally:
            caches = {key: evaluator.__dict__.pop(key) for key in _SYNERGY_CACHES if key in evaluator.__dict__}
            evaluator.__dict__["_synergy_float32"] = {"m_clean": evaluator.m_clean, "caches": caches}
            evaluator.m_clean = m_clean
            evaluator.__dict__.update(saved)


def _effect_cache(evaluator: PatchEvaluator, name: str, n: int) -> torch.Tensor:
    """A NaN-initialised ``[n]`` tensor stored on the evaluator (one per batch)."""
    cache = getattr(evaluator, name, None)
    if cache is None or cache.numel() != n:
        cache = torch.full((n,), float("nan"))
        setattr(evaluator, name, cache)
    return cache


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
