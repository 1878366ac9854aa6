"""Seeded, vectorised bootstrap over prompts, and the per-(method, K) summary table.

All resamples of one statistic are drawn as a single index matrix ``idx`` of shape
``[n_boot, n]`` (row b = the units of resample b, drawn with replacement) from
``numpy.random.default_rng(seed)``. Means of every resample come from one matrix product
``W @ x / n`` with ``W[b, j] = #{i : idx[b, i] = j}`` -- no Python loop over resamples.

Every call starts a fresh generator from ``seed``, so two statistics over the same number of
units use the same resampled units ("common random numbers"): the CI of one cell does not depend
on which other cells are in the table, and CIs of paired cells move together.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import cast

import numpy as np
import pandas as pd

from pie_lib.stats._frame import check_columns, values_of
from pie_lib.stats.design import Design, detect_design, prompt_id_column, seed_spread, unit_matrix
from pie_lib.stats.draws import bootstrap_indices, bootstrap_weights
from pie_lib.stats.resample import log_values, mean_ci, mean_t, median_ci

__all__ = [
    "BootstrapCI",
    "bootstrap_indices",
    "bootstrap_mean_ci",
    "bootstrap_means",
    "bootstrap_weights",
    "describe",
    "percentile_ci",
    "summarize",
]


def bootstrap_means(x: np.ndarray, n_boot: int = 2000, seed: int = 0) -> np.ndarray:
    """Resampled means of ``x`` ``[n]`` or ``[n, m]`` (units along axis 0).

    Returns:
        ``[n_boot]`` (or ``[n_boot, m]``): ``mean_b = (1/n) sum_i x[idx[b, i]]``.
    """
    x = np.asarray(x, dtype=np.float64)
    n = x.shape[0]
    w = bootstrap_weights(bootstrap_indices(n, n_boot, seed), n)
    return (w @ x) / n


def percentile_ci(stats: np.ndarray, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval ``[q_{(1-level)/2}, q_{(1+level)/2}]`` of resampled statistics (axis 0).

    Linear interpolation between order statistics (numpy's default). Where the resamples hold
    +-inf (censored values, see :func:`~pie_lib.stats.budget.crossing_budget`) the
    bounds are the bracketing order statistics instead (lower for the low bound, higher for the
    high bound), so an interval reaches an infinity only when more than ``(1-level)/2`` of the
    resamples are there.
    """
    if not 0 < level < 1:
        raise ValueError(f"level={level} must lie in (0, 1)")
    s = np.asarray(stats, dtype=np.float64)
    q = ((1 - level) / 2, (1 + level) / 2)
    if np.all(np.isfinite(s)):
        lo, hi = np.quantile(s, q, axis=0)
    else:
        lo = np.quantile(s, q[0], axis=0, method="lower")
        hi = np.quantile(s, q[1], axis=0, method="higher")
    return lo, hi


@dataclass(frozen=True)
class BootstrapCI:
    """A point estimate with its percentile bootstrap interval."""

    estimate: float
    low: float
    high: float
    level: float
    n: int
    n_boot: int
    seed: int

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def bootstrap_mean_ci(x: np.ndarray, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> BootstrapCI:
    """Mean of ``x`` ``[n]`` with the percentile bootstrap CI of the mean (see :func:`bootstrap_means`)."""
    x = np.asarray(x, dtype=np.float64)
    lo, hi = percentile_ci(bootstrap_means(x, n_boot, seed), level)
    return BootstrapCI(float(x.mean()), float(lo), float(hi), level, int(x.size), n_boot, seed)


def describe(x: np.ndarray, design: Design, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> dict[str, float]:
    """Unit-aware summary of rows ``x`` ``[n_rows]`` laid out by ``design``
    (:class:`~pie_lib.stats.design.Design`).

    Per-unit values ``u`` = the mean over a prompt's seeds (shared prompts) or the rows
    themselves; every statistic below is over units, never over copies of a prompt:

    - ``mean``, ``std`` (ddof=1, between units), ``se`` and ``dof`` (:func:`~pie_lib.stats.resample.mean_t`);
    - ``ci_low, ci_high``: BCa interval of the mean (:func:`~pie_lib.stats.resample.mean_ci`);
    - ``median, median_ci_low, median_ci_high``: median of ``u``, percentile bootstrap interval;
    - ``gmean, gmean_ci_low, gmean_ci_high``: geometric mean ``exp(mean of per-unit mean log x)``
      with the exponentiated BCa interval of that mean (NaN, with ``n_nonpositive`` > 0, when a
      value is <= 0: the log scale is then undefined, nothing is floored);
    - ``seed_sd``: the seed component (:func:`~pie_lib.stats.design.seed_spread`).

    ``n_boot=0`` skips the bootstrap (intervals NaN): the point estimates alone, cheaply.
    """
    u = unit_matrix(x, design)
    g = design.unit_groups()
    t = mean_t(u, g)
    boot = n_boot > 0
    lo, hi = mean_ci(u, g, n_boot, seed, level) if boot else (np.nan, np.nan)
    med, mlo, mhi = median_ci(u, g, n_boot, seed, level) if boot else (float(np.median(u)), np.nan, np.nan)
    logs, bad = log_values(x)
    if logs is None:
        gm = glo = ghi = np.nan
    else:
        lu = unit_matrix(logs, design)
        llo, lhi = mean_ci(lu, g, n_boot, seed, level) if boot else (np.nan, np.nan)
        gm, glo, ghi = float(np.exp(lu.mean())), float(np.exp(llo)), float(np.exp(lhi))
    return {
        "mean": t.mean,
        "std": t.sd_units,
        "se": t.se,
        "dof": t.dof,
        "ci_low": float(lo),
        "ci_high": float(hi),
        "median": med,
        "median_ci_low": mlo,
        "median_ci_high": mhi,
        "gmean": gm,
        "gmean_ci_low": glo,
        "gmean_ci_high": ghi,
        "n_nonpositive": bad,
        "seed_sd": seed_spread(x, design),
    }


def summarize(
    df: pd.DataFrame,
    by: Sequence[str] = ("method", "k"),
    value: str = "kl",
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> pd.DataFrame:
    """Mean, median, geometric mean with their intervals per group, on the right unit, plus seed spread.

    The unit is the prompt (:mod:`pie_lib.stats.design`): when seeds share prompts a prompt's
    value is its mean over seeds and prompts are resampled as clusters; when each seed has its
    own prompts the resampling is hierarchical (seeds, then prompts). Statistics: see
    :func:`describe`. Besides them: ``n_prompts, n_seeds, unit, design, basis`` (what decided
    prompt identity), ``n`` (= n_prompts, the number of independent prompts; kept for older
    readers), ``n_rows``; ``mean_seed_<s>`` = mean over the rows of seed s, ``seed_mean`` /
    ``seed_std`` (ddof=1, NaN with one seed) the mean and spread of those per-seed means.

    Args:
        df: results, one row per (method, k, seed, prompt_idx); needs ``by``, ``value``, ``seed``
            (and ``prompt_idx`` unless ``by`` holds it; a prompt id column is used when present).
        by: grouping columns. value: column to summarise (bools count as 0/1).
        n_boot, seed, level: bootstrap resamples, generator seed, CI level.
    Returns:
        DataFrame, one row per group, sorted by ``by``.
    """
    by = list(by)
    check_columns(df, [*by, value, "seed"])
    has_idx = "prompt_idx" in df.columns
    idcol = prompt_id_column(df)
    order = [*by, "seed"] + (["prompt_idx"] if has_idx and "prompt_idx" not in by else [])
    cols = list(dict.fromkeys([*order, value] + ([idcol] if idcol else []) + (["prompt_idx"] if has_idx else [])))
    data = cast(pd.DataFrame, df[cols]).sort_values(order, kind="stable")
    data = data.assign(_x=values_of(data, value))
    rows = []
    for key, g in data.groupby(by, sort=True):
        x = g["_x"].to_numpy()
        pidx = g["prompt_idx"].to_numpy() if has_idx else np.arange(len(g))
        design = detect_design(g["seed"].to_numpy(), pidx, g[idcol].to_numpy() if idcol else None, idcol)
        st = describe(x, design, n_boot, seed, level)
        seed_means = cast(pd.Series, g.groupby("seed")["_x"].mean())
        rows.append(
            {
                **dict(zip(by, key if isinstance(key, tuple) else (key,))),
                **design.info(),
                "basis": design.basis,
                "n": design.n_prompts,
                "n_rows": design.n_rows,
                **st,
                "seed_mean": float(seed_means.mean()),
                "seed_std": float(cast(float, seed_means.std(ddof=1))) if seed_means.size > 1 else np.nan,
            }
        )
    out = pd.DataFrame(rows)
    if "seed" not in by:
        per_seed = cast(pd.Series, data.groupby([*by, "seed"])["_x"].mean()).unstack("seed")
        per_seed.columns = [f"mean_seed_{s}" for s in per_seed.columns]
        out = out.merge(per_seed.reset_index(), on=by, how="left")
    out.attrs.update(value=value, level=level, n_boot=n_boot, seed=seed, ci_method="BCa")
    return out
