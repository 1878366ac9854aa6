"""Effective budget (spec §3, §9): the K a baseline needs to match the reference at ``k_ref``.

For a baseline with budget ladder ``K_1 < ... < K_L`` and mean curve ``c(K_j) = mean_i x(i, K_j)``
(mean over prompts, linearly interpolated in K between ladder points), and the reference's
mean ``R = mean_i x_ref(i, k_ref)`` over the same prompts, with ``g(K) = c(K) - R`` when lower
is better (``R - c(K)`` when higher is better):

    K_eff = the first K, scanning upward, with g(K) <= 0; on segment [K_{j-1}, K_j] where g
    changes sign, K_eff = K_{j-1} + (K_j - K_{j-1}) * g(K_{j-1}) / (g(K_{j-1}) - g(K_j)).

A non-monotone curve thus gives its first crossing. No extrapolation: ``K_eff = inf`` when the
baseline never reaches the reference inside the ladder (K_eff > K_L, status "above_ladder"), and
``K_eff = NaN`` when it is already strictly better at K_1 (K_eff < K_1, status
"below_ladder"). Cost saving of using the reference at k_ref instead of the baseline at K_eff:
``saving = 1 - k_ref / K_eff`` (NaN when K_eff is not finite).

Uncertainty: a paired percentile bootstrap over prompts on the right unit
(:mod:`pie_lib.stats.design`): shared prompts are resampled as clusters with all their seeds,
seed-specific prompts hierarchically (seeds, then prompts; :mod:`pie_lib.stats.resample`); each
resample recomputes both R and the whole curve from the same units, then K_eff (a percentile
interval: K_eff is censored at the ladder's ends, where BCa's smoothness assumptions fail); ``frac_above`` / ``frac_below`` are the fractions of resamples without a crossing inside
the ladder on either side (``frac_no_crossing`` their sum). For the interval, censored
resamples are ordered as +inf (above) / -inf (below); an interval bound landing there is
reported as inf / NaN.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, cast

import numpy as np
import pandas as pd

from pie_lib.stats._frame import (
    MissingResultError,
    cell_keys,
    cell_values,
    check_cell,
    check_columns,
    design_of,
    method_curve_matrix,
    require_same_units,
)
from pie_lib.stats.bootstrap import percentile_ci
from pie_lib.stats.design import Design, detect_design, unit_matrix
from pie_lib.stats.resample import shrunk_values, unit_weights

Better = Literal["lower", "higher"]


def crossing_budget(ladder: np.ndarray, curves: np.ndarray, target: np.ndarray, better: Better = "lower") -> np.ndarray:
    """First K at which piecewise-linear curves reach their targets (formula in the module doc).

    Args:
        ladder: ``[L]`` strictly increasing budgets. curves: ``[..., L]`` curve values at the
            ladder. target: ``[...]`` value to reach. better: "lower" (KL) or "higher".
    Returns:
        ``[...]`` K_eff: finite inside ``[K_1, K_L]``; ``inf`` if never reached in the ladder;
        ``NaN`` if already strictly better at ``K_1``.
    """
    ladder = np.asarray(ladder, dtype=np.float64)
    curves = np.asarray(curves, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    if ladder.ndim != 1 or curves.shape[-1] != ladder.size or np.any(np.diff(ladder) <= 0):
        raise ValueError(f"ladder must be strictly increasing and match curves' last axis; got {ladder}")
    g = curves - target[..., None] if better == "lower" else target[..., None] - curves
    reached = g <= 0
    hit = reached.any(axis=-1)
    j = reached.argmax(axis=-1)
    jm = np.maximum(j - 1, 0)
    g_prev = np.take_along_axis(g, jm[..., None], axis=-1)[..., 0]
    g_at = np.take_along_axis(g, j[..., None], axis=-1)[..., 0]
    with np.errstate(divide="ignore", invalid="ignore"):
        k = ladder[jm] + (ladder[j] - ladder[jm]) * g_prev / (g_prev - g_at)
    k = np.where(j == 0, np.where(g_at == 0, ladder[0], np.nan), k)
    return np.where(hit, k, np.inf)


def cost_saving(k_ref: float, k_eff: np.ndarray | float) -> np.ndarray:
    """``1 - k_ref / K_eff``: the fraction of budget saved; NaN where K_eff is not finite."""
    k_eff = np.asarray(k_eff, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(np.isfinite(k_eff), 1.0 - k_ref / k_eff, np.nan)


def _sd(x: np.ndarray) -> float:
    """Sample sd (ddof=1); NaN with fewer than 2 values or any non-finite value."""
    return float(np.std(x, ddof=1)) if x.size > 1 and np.all(np.isfinite(x)) else np.nan


def _status(k: float) -> str:
    return "ok" if np.isfinite(k) else ("above_ladder" if np.isinf(k) else "below_ladder")


def _crossing_with_ci(
    ladder: np.ndarray,
    v: np.ndarray,
    r: np.ndarray,
    k_ref: int,
    better: Better,
    n_boot: int,
    seed: int,
    level: float,
    design: Design | None = None,
) -> dict[str, float | str]:
    """Point K_eff and paired bootstrap CI for curve rows ``v`` ``[n_rows, L]`` and reference rows ``r`` ``[n_rows]``.

    Rows become units by ``design`` (None: each row is a prompt of one seed); resampling is that
    of :mod:`pie_lib.stats.resample` (prompts as clusters; seeds then prompts for seed-specific prompts).
    """
    if design is None:
        design = detect_design(np.zeros(r.size, dtype=np.int64), np.arange(r.size))
    u = unit_matrix(np.column_stack([v, r]), design)  # [n_units, L + 1]
    g = design.unit_groups()
    k_hat = float(crossing_budget(ladder, u[:, :-1].mean(axis=0), np.asarray(u[:, -1].mean()), better))
    w = unit_weights(g, n_boot, seed)
    means = (w @ shrunk_values(u, g)) / w.sum(axis=1, keepdims=True)
    kb = crossing_budget(ladder, means[:, :-1], means[:, -1], better)
    above, below = np.isposinf(kb), np.isnan(kb)
    lo, hi = percentile_ci(np.where(below, -np.inf, kb), level)
    lo, hi = (float(x) if x != -np.inf else np.nan for x in (lo, hi))
    s_lo, s_hi = cost_saving(k_ref, lo), cost_saving(k_ref, hi)
    return {
        **design.info(),
        "ref_mean": float(u[:, -1].mean()),
        "k_eff": k_hat,
        "status": _status(k_hat),
        "ci_low": lo,
        "ci_high": hi,
        "frac_no_crossing": float((above | below).mean()),
        "frac_above": float(above.mean()),
        "frac_below": float(below.mean()),
        "cost_saving": float(cost_saving(k_ref, k_hat)),
        "saving_ci_low": float(s_lo),
        "saving_ci_high": float(s_hi),
        "k_min": float(ladder[0]),
        "k_max": float(ladder[-1]),
    }


@dataclass(frozen=True)
class EffectiveBudgetResult:
    """Effective budgets of the baselines against ``reference`` at ``k_ref``.

    Attributes:
        per_seed: one row per (baseline, seed): ``baseline, seed, n_prompts, ref_mean, k_eff,
            status, ci_low, ci_high, frac_no_crossing, frac_above, frac_below, cost_saving,
            saving_ci_low, saving_ci_high, k_min, k_max``.
        summary: one row per baseline: ``baseline, n_seeds, n_seeds_crossed, k_eff_mean,
            k_eff_std, cost_saving_mean, cost_saving_std`` (over the per-seed point estimates;
            inf / NaN propagate), then the pooled estimate over all (seed, prompt) units:
            ``k_eff, status, ci_low, ci_high, frac_no_crossing, frac_above, frac_below,
            cost_saving, saving_ci_low, saving_ci_high, ref_mean, n_prompts, k_min, k_max``.
        curves: ``baseline, seed, k, mean`` -- the per-seed mean curves (seed <NA> = pooled).
    """

    reference: str
    k_ref: int
    value: str
    better: Better
    per_seed: pd.DataFrame = field(repr=False)
    summary: pd.DataFrame
    curves: pd.DataFrame = field(repr=False)


def effective_budget(
    df: pd.DataFrame,
    reference: str = "fap-synergy",
    k_ref: int = 50,
    baselines: Sequence[str] | None = None,
    value: str = "kl",
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
    ks: Sequence[int] | None = None,
    seeds: Sequence[int] | None = None,
    better: Better = "lower",
) -> EffectiveBudgetResult:
    """K at which each baseline's mean curve matches ``reference`` at ``k_ref``, per seed and pooled.

    Formulas and the no-extrapolation convention: see the module docstring.

    Args:
        df: results, one row per (method, k, seed, prompt_idx).
        reference, k_ref: the reference cell (paper: FAP-Synergy at K=50).
        baselines: methods to place on the reference (default: every other method).
        value: the curve's column (paper: last-token "kl"). better: "lower" or "higher".
        n_boot, seed, level: bootstrap resamples, generator seed, CI level.
        ks: the ladder (default: every K the baseline has). It must be present for every seed.
        seeds: seeds to use (default: the reference's seeds at k_ref).
    Returns:
        :class:`EffectiveBudgetResult`.
    Raises:
        MissingResultError: reference / baseline / K / seed absent, or a ladder of < 2 budgets.
        UnpairedDataError: a baseline's prompts differ from the reference's, or across its K.
    """
    if better not in ("lower", "higher"):
        raise ValueError(f"better={better!r} must be 'lower' or 'higher'")
    check_columns(df, ["method", "k", "seed", "prompt_idx", value])
    check_cell(df, reference, k_ref, seeds)
    if seeds is None:
        seeds = sorted(set(df.loc[(df["method"] == reference) & (df["k"] == k_ref), "seed"].tolist()))
    seeds = [int(s) for s in seeds]
    ref = cell_values(df, reference, k_ref, value, seeds)
    design = design_of(cast(pd.MultiIndex, ref.index), cell_keys(df, reference, k_ref, seeds))
    if baselines is None:
        baselines = sorted(m for m in df["method"].unique() if m != reference)
    per_seed, summary, curves = [], [], []
    for base in baselines:
        check_cell(df, base, None, seeds)
        ladder_ks = sorted(set(df.loc[df["method"] == base, "k"].tolist())) if ks is None else sorted(ks)
        if len(ladder_ks) < 2:
            raise MissingResultError(f"baseline {base!r} has budgets {ladder_ks}; an effective budget needs >= 2")
        mat = method_curve_matrix(df, base, ladder_ks, value, seeds)
        require_same_units(ref.index, mat.index, f"reference ({reference!r}, K={k_ref})", f"baseline {base!r}")
        mat = mat.reindex(ref.index)
        ladder = np.asarray(ladder_ks, dtype=np.float64)
        unit_seed = ref.index.get_level_values("seed").to_numpy()
        v_all, r_all = mat.to_numpy(), ref.to_numpy()
        for s in seeds:
            m = unit_seed == s
            row = _crossing_with_ci(ladder, v_all[m], r_all[m], k_ref, better, n_boot, seed, level)
            per_seed.append({"baseline": base, "seed": s, **row})
            curves.append(pd.DataFrame({"baseline": base, "seed": s, "k": ladder_ks, "mean": v_all[m].mean(axis=0)}))
        u_curve = unit_matrix(v_all, design)
        pooled = _crossing_with_ci(ladder, v_all, r_all, k_ref, better, n_boot, seed, level, design)
        curves.append(pd.DataFrame({"baseline": base, "seed": pd.NA, "k": ladder_ks, "mean": u_curve.mean(axis=0)}))
        ke = np.array([r["k_eff"] for r in per_seed if r["baseline"] == base])
        sv = cost_saving(k_ref, ke)
        summary.append(
            {
                "baseline": base,
                "n_seeds": len(seeds),
                "n_seeds_crossed": int(np.isfinite(ke).sum()),
                "k_eff_mean": float(np.mean(ke)),
                "k_eff_std": _sd(ke),
                "cost_saving_mean": float(np.mean(sv)),
                "cost_saving_std": _sd(sv),
                **pooled,
            }
        )
    per_seed_df = pd.DataFrame(per_seed)
    curves_df = pd.concat(curves, ignore_index=True)
    curves_df["seed"] = curves_df["seed"].astype("Int64")
    return EffectiveBudgetResult(reference, int(k_ref), value, better, per_seed_df, pd.DataFrame(summary), curves_df)
