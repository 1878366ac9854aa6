"""Seeded, vectorised percentile bootstrap over prompts, and the per-(method, K) summary table.

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

import numpy as np
import pandas as pd

from pie_lib.stats._frame import check_columns, values_of


def bootstrap_indices(n: int, n_boot: int, seed: int) -> np.ndarray:
    """The resampling index matrix.

    Args:
        n: number of units (prompts); n_boot: number of resamples; seed: generator seed.
    Returns:
        ``idx`` ``[n_boot, n]`` int64, ``idx[b]`` = the n units of resample b (with replacement).
    """
    if n <= 0:
        raise ValueError(f"cannot bootstrap over n={n} units")
    if n_boot <= 0:
        raise ValueError(f"n_boot={n_boot} must be a positive integer")
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n), dtype=np.int64)


def bootstrap_weights(idx: np.ndarray, n: int) -> np.ndarray:
    """Counts ``W[b, j] = #{i : idx[b, i] = j}`` of an index matrix ``idx`` ``[n_boot, n]``.

    The mean of any per-unit quantity ``x`` ``[n, ...]`` over resample b is then ``(W @ x)[b] / n``.
    """
    n_boot = idx.shape[0]
    flat = (idx + n * np.arange(n_boot, dtype=np.int64)[:, None]).ravel()
    return np.bincount(flat, minlength=n_boot * n).reshape(n_boot, n).astype(np.float64)


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


def summarize(
    df: pd.DataFrame,
    by: Sequence[str] = ("method", "k"),
    value: str = "kl",
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> pd.DataFrame:
    """Mean, std, median and bootstrap CI of ``value`` per group, plus its per-seed means.

    Units are the rows of a group, i.e. ``(seed, prompt_idx)`` prompts pooled over seeds.

    - ``mean = (1/n) sum_i x_i``; ``std`` with ddof=1 (the spread over prompts, as in the
      paper's "mean ± std"); ``median``.
    - ``ci_low, ci_high``: percentile bootstrap CI (``level``) of the mean over prompts.
    - ``mean_seed_<s>``: mean over the prompts of seed s; ``seed_mean`` and ``seed_std``
      (ddof=1, NaN with one seed) are the mean and spread of those per-seed means -- the
      "mean ± std over seeds" of a multi-seed report. Omitted when ``"seed"`` is in ``by``.

    Args:
        df: results, one row per (method, k, seed, prompt_idx); needs ``by``, ``value``, ``seed``.
        by: grouping columns. value: column to summarise (bools count as 0/1).
        n_boot, seed, level: bootstrap resamples, generator seed, CI level.
    Returns:
        DataFrame: ``*by, n, n_seeds, mean, std, median, ci_low, ci_high, seed_mean, seed_std,
        mean_seed_<s>...``, one row per group, sorted by ``by``.
    """
    by = list(by)
    check_columns(df, [*by, value, "seed"])
    order = [*by, "seed"] + (["prompt_idx"] if "prompt_idx" in df.columns and "prompt_idx" not in by else [])
    data = df[list(dict.fromkeys([*order, value]))].sort_values(order, kind="stable")
    data = data.assign(_x=values_of(data, value))
    rows = []
    for key, g in data.groupby(by, sort=True):
        x = g["_x"].to_numpy()
        ci = bootstrap_mean_ci(x, n_boot, seed, level)
        seed_means = g.groupby("seed")["_x"].mean()
        rows.append(
            {
                **dict(zip(by, key if isinstance(key, tuple) else (key,))),
                "n": x.size,
                "n_seeds": int(seed_means.size),
                "mean": ci.estimate,
                "std": float(x.std(ddof=1)) if x.size > 1 else np.nan,
                "median": float(np.median(x)),
                "ci_low": ci.low,
                "ci_high": ci.high,
                "seed_mean": float(seed_means.mean()),
                "seed_std": float(seed_means.std(ddof=1)) if seed_means.size > 1 else np.nan,
            }
        )
    out = pd.DataFrame(rows)
    if "seed" not in by:
        per_seed = data.groupby([*by, "seed"])["_x"].mean().unstack("seed")
        per_seed.columns = [f"mean_seed_{s}" for s in per_seed.columns]
        out = out.merge(per_seed.reset_index(), on=by, how="left")
    out.attrs.update(value=value, level=level, n_boot=n_boot, seed=seed)
    return out
