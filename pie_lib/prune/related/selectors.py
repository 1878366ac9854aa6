"""Related methods as registry entries: Edge Pruning, HAP, MIB ensembles (spec §10).

Registered names (``pie prune --methods ...``) and the ``MethodParams.extra`` keys they read
(see :mod:`pie_lib.prune.related.config`):

==========================  ========================================================  ============
name                        what                                                      extra keys
==========================  ========================================================  ============
``edge-pruning``            one hard-concrete mask per occurrence of each prompt      ``ep_*``
``edge-pruning-shared``     one mask per (layer, position-from-end, feature) shared   ``ep_*``
                            by the prompts of a batch (``ep_share``)
``hap``                     top-M by |FAP| prescreen, masks over the pool only        ``ep_*``,
                                                                                      ``hap_*``
``ensemble-mean/min/max``   parallel ensemble of per-prompt normalised ranks          ``ens_*``
``ensemble-seq``            FAP ranks warm-start the mask logits, then mask learning  ``ep_*``
==========================  ========================================================  ============

Final binarisation of every mask method keeps exactly ``min(K_b, n_b)`` occurrences of prompt b
by ``log_alpha`` ranking (shared masks: ties between positions of one unit broken by |Δa|; HAP:
pool members first). The scores recorded with a selection are ``log_alpha`` shifted per prompt
so the lowest is 0 (non-negative and monotone, so |score| order = log_alpha order); HAP gives
occurrences outside its pool score 0 and pool members ``log_alpha - min_pool + 1``.
"""

from __future__ import annotations

import dataclasses

import torch

from pie_lib.errors import BudgetError
from pie_lib.prune.context import BatchContext
from pie_lib.prune.methods import fap
from pie_lib.prune.params import MethodParams
from pie_lib.prune.registry import METHODS, register_method
from pie_lib.prune.related.config import EnsembleConfig, HapConfig, MaskConfig, config_from_extra
from pie_lib.prune.related.masks import MaskResult, learn_masks
from pie_lib.prune.related.ranking import normalised_rank, topk_lex
from pie_lib.prune.select import Budget, budget_per_prompt, topk_global

Selection = tuple[torch.Tensor, torch.Tensor]


def _final_density(ctx: BatchContext, kv: torch.Tensor, pool: torch.Tensor | None = None) -> torch.Tensor:
    """``[B]`` ``min(1, K_b / n_b)`` with n_b the active (or pool) size."""
    n = ctx.occ.counts().cpu() if pool is None else pool
    return (kv.double() / n.clamp_min(1).double()).clamp(max=1.0).float()


def _init(n: int, cfg: MaskConfig, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(int(seed))
    return cfg.init_mean + cfg.init_std * torch.randn(n, generator=g)


def _shifted(ctx: BatchContext, log_alpha: torch.Tensor) -> torch.Tensor:
    """``log_alpha - min over the prompt`` (>= 0, monotone within each prompt)."""
    prompt = ctx.occ.prompt.cpu()
    lo = torch.full((ctx.occ.n_prompts,), float("inf")).scatter_reduce(0, prompt, log_alpha, "amin")
    return (log_alpha - lo[prompt]).float()


def _learn_per_prompt(
    ctx: BatchContext, kv: torch.Tensor, init: torch.Tensor, cfg: MaskConfig, seed: int, method: str
) -> MaskResult:
    N = len(ctx.occ)
    return learn_masks(
        ctx, torch.arange(N), torch.arange(N), init, _final_density(ctx, kv), cfg, seed, method=method, k=kv
    )


# ----------------------------------------------------------------------------- Edge Pruning
def edge_pruning(ctx: BatchContext, k: Budget, seed: int, params: MethodParams) -> Selection:
    """Edge Pruning over occurrences: one hard-concrete mask per occurrence, per prompt.

    ``log_alpha ~ N(ep_init_mean, ep_init_std)``; loss KL + λ1 (s - t) + λ2 (s - t)^2, t ramped
    from 1 to K_b / n_b; keep the top ``min(K_b, n_b)`` by trained log_alpha.
    """
    cfg = config_from_extra(MaskConfig, params.extra)
    kv = budget_per_prompt(k, ctx.occ.n_prompts)
    res = _learn_per_prompt(ctx, kv, _init(len(ctx.occ), cfg, seed), cfg, seed, "edge-pruning")
    return topk_lex(ctx.occ, [res.log_alpha], kv), _shifted(ctx, res.log_alpha)


SHARE_UNITS = ("layer-feature", "layer-pos-feature")


def shared_units(ctx: BatchContext, share: str = "layer-pos-feature") -> tuple[torch.Tensor, torch.Tensor]:
    """Sharing unit of ``edge-pruning-shared``.

    Args:
        share: "layer-pos-feature" (default; position counted from the end of the prompt) or
            "layer-feature" (shared across positions too).
    Returns:
        (unit keys ``[U]``, unit of each occurrence ``[N]``).
    """
    occ = ctx.occ
    key = occ.layer.cpu() * ctx.clt.n_features + occ.feat.cpu()
    if share == "layer-pos-feature":
        from_end = ctx.batch.seq_len - 1 - occ.pos.cpu()
        key = key * ctx.batch.seq_len + from_end
    elif share != "layer-feature":
        raise BudgetError(f"ep_share={share!r}; use one of {SHARE_UNITS}")
    return torch.unique(key, return_inverse=True)


def edge_pruning_shared(ctx: BatchContext, k: Budget, seed: int, params: MethodParams) -> Selection:
    """Edge Pruning with one mask per unit shared by every prompt of the batch, so the learned mask
    is one circuit that transfers across prompts. Unit (``ep_share``): (layer, position from the
    end, feature) by default -- on the toy IOI world at K=25 its circuits have ~10x lower KL than
    (layer, feature) units, which must keep or drop a feature at every position at once. The
    density penalty is still per prompt (expected kept fraction of its occurrences vs K_b / n_b);
    each prompt keeps its top ``min(K_b, n_b)`` occurrences by unit log_alpha, ties by |Δa|.
    """
    cfg = config_from_extra(MaskConfig, params.extra)
    occ = ctx.occ
    kv = budget_per_prompt(k, occ.n_prompts)
    units, unit_of = shared_units(ctx, cfg.share)
    res = learn_masks(
        ctx,
        torch.arange(len(occ)),
        unit_of,
        _init(units.numel(), cfg, seed),
        _final_density(ctx, kv),
        cfg,
        seed,
        method="edge-pruning-shared",
        k=kv,
    )
    la = res.log_alpha[unit_of] if len(occ) else torch.zeros(0)
    delta = ctx.evaluator.delta.abs().cpu().float()
    return topk_lex(occ, [la, delta], kv), _shifted(ctx, la)


# ----------------------------------------------------------------------------- HAP
def hap_pool(ctx: BatchContext, kv: torch.Tensor, cfg: HapConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """HAP prescreen: the top ``M_b = min(n_b, max(ceil(mult · K_b), min_pool))`` occurrences of
    each prompt by |FAP|. Returns (in-pool mask ``[N]``, ``[B]`` pool sizes)."""
    if cfg.mult < 1 or cfg.min_pool < 1:
        raise BudgetError(f"hap_mult={cfg.mult} must be >= 1 and hap_min_pool={cfg.min_pool} >= 1")
    n = ctx.occ.counts().cpu()
    m = torch.maximum(torch.ceil(kv.double() * cfg.mult).long(), torch.full_like(kv, cfg.min_pool))
    m = torch.minimum(m, n).clamp_min(1)
    in_pool = topk_global(ctx.occ, fap(ctx), m)
    return in_pool, torch.minimum(m, n)


def hap(ctx: BatchContext, k: Budget, seed: int, params: MethodParams) -> Selection:
    """HAP: FAP prescreen to a pool of M_b occurrences per prompt, then Edge-Pruning masks over the
    pool only; the occurrences outside it stay removed (z = 0) throughout. Target density K_b / M_b;
    ``hap_steps`` / ``hap_warmup`` override ``ep_steps`` / ``ep_warmup``."""
    cfg = config_from_extra(MaskConfig, params.extra)
    hcfg = config_from_extra(HapConfig, params.extra)
    if hcfg.steps is not None or hcfg.warmup is not None:
        cfg = dataclasses.replace(
            cfg,
            steps=cfg.steps if hcfg.steps is None else hcfg.steps,
            warmup=cfg.warmup if hcfg.warmup is None else hcfg.warmup,
        )
    occ = ctx.occ
    kv = budget_per_prompt(k, occ.n_prompts)
    in_pool, m = hap_pool(ctx, kv, hcfg)
    pool = in_pool.nonzero().squeeze(-1)
    out = (~in_pool).nonzero().squeeze(-1)
    res = learn_masks(
        ctx,
        pool,
        torch.arange(pool.numel()),
        _init(pool.numel(), cfg, seed),
        _final_density(ctx, kv, m),
        cfg,
        seed,
        fixed_removed=out,
        method="hap",
        k=kv,
    )
    la = torch.zeros(len(occ))
    la[pool] = res.log_alpha
    keep = topk_lex(occ, [in_pool.float(), la, fap(ctx).abs()], kv)
    prompt = occ.prompt.cpu()
    lo = torch.full((occ.n_prompts,), float("inf")).scatter_reduce(0, prompt[pool], res.log_alpha, "amin")
    scores = torch.where(in_pool, la - lo[prompt] + 1.0, torch.zeros_like(la))
    return keep, scores.float()


# ----------------------------------------------------------------------------- ensembles
ENSEMBLE_NAMES = ("ensemble-mean", "ensemble-min", "ensemble-max", "ensemble-seq")


def member_ranks(
    ctx: BatchContext, members: tuple[str, ...], k: Budget, seed: int, params: MethodParams
) -> torch.Tensor:
    """``[M, N]`` normalised rank in [0, 1] (1 = best within its prompt) of each member method.

    A member's ranking puts its own K-selection first, then |score| order, so a member whose
    selection is not plain top-K (FAP-Synergy, ACDC, mask methods) is represented faithfully and an
    ensemble of one method reproduces that method's selection exactly.
    """
    if not members:
        raise BudgetError("ens_members is empty; name at least one registered method")
    bad = [m for m in members if m in ENSEMBLE_NAMES]
    if bad:
        raise BudgetError(f"ensembles cannot contain ensembles: {bad}")
    unknown = [m for m in members if m not in METHODS]
    if unknown:
        raise BudgetError(f"unknown ensemble member(s) {unknown}; choose from {sorted(METHODS)}")
    kv = budget_per_prompt(k, ctx.occ.n_prompts)
    out = []
    for name in members:
        m = METHODS[name]
        key = f"ensemble-member:{name}:{seed if m.seeded else '-'}:{','.join(map(str, kv.tolist()))}"

        def run(m=m) -> torch.Tensor:
            keep, sc = m.select(ctx, kv, seed, params)
            return torch.stack([keep.float().cpu(), sc.float().cpu()])

        keep, sc = ctx.cached(key, run)
        out.append(normalised_rank(ctx.occ, [keep, sc.abs()]))
    return torch.stack(out) if out else torch.zeros(0, len(ctx.occ))


def ensemble_combine(ranks: torch.Tensor, how: str) -> torch.Tensor:
    """Combine ``[M, N]`` normalised ranks by "mean", "min" or "max" -> ``[N]``."""
    if how == "mean":
        return ranks.mean(0)
    if how == "min":
        return ranks.min(0).values
    if how == "max":
        return ranks.max(0).values
    raise ValueError(f"ensemble combination {how!r}; use mean, min or max")


def parallel_ensemble(how: str):
    """Selector of the parallel ensemble ``how``: top-K by the combined normalised rank, ties
    broken by the mean rank, then occurrence order. Scores recorded = the combined rank."""

    def select(ctx: BatchContext, k: Budget, seed: int, params: MethodParams) -> Selection:
        ecfg = config_from_extra(EnsembleConfig, params.extra)
        ranks = member_ranks(ctx, ecfg.members, k, seed, params)
        comb = ensemble_combine(ranks, how)
        return topk_lex(ctx.occ, [comb, ranks.mean(0)], k), comb

    select.__doc__ = f"MIB parallel ensemble ({how} of per-prompt normalised member ranks)."
    return select


def ensemble_seq(ctx: BatchContext, k: Budget, seed: int, params: MethodParams) -> Selection:
    """MIB sequential ensemble: ``log_alpha_0 = seq_lo + (seq_hi - seq_lo) · r_FAP`` (+ N(0, init_std)
    noise), r_FAP the per-prompt normalised |FAP| rank; then per-prompt mask learning as Edge Pruning."""
    cfg = config_from_extra(MaskConfig, params.extra)
    kv = budget_per_prompt(k, ctx.occ.n_prompts)
    r = normalised_rank(ctx.occ, [fap(ctx).abs()])
    g = torch.Generator().manual_seed(int(seed))
    init = cfg.seq_lo + (cfg.seq_hi - cfg.seq_lo) * r + cfg.init_std * torch.randn(r.numel(), generator=g)
    res = _learn_per_prompt(ctx, kv, init, cfg, seed, "ensemble-seq")
    return topk_lex(ctx.occ, [res.log_alpha], kv), _shifted(ctx, res.log_alpha)


RELATED_METHODS = (
    "edge-pruning",
    "edge-pruning-shared",
    "hap",
    "ensemble-mean",
    "ensemble-min",
    "ensemble-max",
    "ensemble-seq",
)

register_method(
    "edge-pruning",
    edge_pruning,
    True,
    "Edge Pruning on CLT occurrences: learned hard-concrete masks per prompt (seeded)",
)
register_method(
    "edge-pruning-shared",
    edge_pruning_shared,
    True,
    "Edge Pruning with one mask per (layer, position-from-end, feature) shared by a batch's prompts (seeded)",
)
register_method("hap", hap, True, "HAP: |FAP| prescreen to max(mult*K, min_pool), masks learned over the pool (seeded)")
register_method("ensemble-mean", parallel_ensemble("mean"), True, "MIB parallel ensemble: mean of normalised ranks")
register_method("ensemble-min", parallel_ensemble("min"), True, "MIB parallel ensemble: min of normalised ranks")
register_method("ensemble-max", parallel_ensemble("max"), True, "MIB parallel ensemble: max of normalised ranks")
register_method("ensemble-seq", ensemble_seq, True, "MIB sequential ensemble: FAP-rank warm start + mask learning")

__all__ = [
    "ENSEMBLE_NAMES",
    "RELATED_METHODS",
    "edge_pruning",
    "edge_pruning_shared",
    "ensemble_combine",
    "ensemble_seq",
    "hap",
    "hap_pool",
    "member_ranks",
    "parallel_ensemble",
    "shared_units",
]
