"""Paired comparisons of two (method, K) cells over the same prompts, and the reranking ablation.

Units are ``(seed, prompt_idx)``; differences are ``d_i = x_a(i) - x_b(i)``. With several seeds
the prompt-level tests pool all units as independent; when seeds reuse the same prompts that
is optimistic, and the seed-level test of :func:`matched_seed_ablation` (one mean difference
per seed) is the conservative alternative.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import stats as sps

from pie_lib.stats._frame import Cell, MissingResultError, check_cell, check_columns, paired_cells
from pie_lib.stats.bootstrap import bootstrap_means, percentile_ci


@dataclass(frozen=True)
class PairedTestResult:
    """Paired comparison of cell ``a`` against cell ``b`` on ``value`` (d = a - b per prompt)."""

    a: Cell
    b: Cell
    value: str
    n: int
    n_seeds: int
    mean_a: float
    mean_b: float
    mean_diff: float
    std_diff: float
    ci_low: float
    ci_high: float
    level: float
    t_stat: float
    p_t: float
    w_stat: float
    p_wilcoxon: float
    cohens_dz: float
    diffs: pd.DataFrame = field(repr=False, compare=False)

    def as_row(self) -> dict[str, object]:
        """The scalar fields as one table row (``diffs`` left out)."""
        return {k: v for k, v in self.__dict__.items() if k != "diffs"}


def paired_stats(d: np.ndarray, n_boot: int, seed: int, level: float) -> dict[str, float]:
    """Statistics of paired differences ``d`` ``[n]``.

    - ``mean_diff = mean(d)``, ``std_diff = sd(d)`` (ddof=1).
    - ``ci_low, ci_high``: percentile bootstrap CI of ``mean(d)`` over prompts.
    - ``t_stat, p_t``: paired t-test, ``t = mean(d) / (sd(d)/sqrt(n))``, two-sided, df = n-1
      (equal to ``scipy.stats.ttest_rel(a, b)``).
    - ``w_stat, p_wilcoxon``: Wilcoxon signed-rank test (scipy, zero differences dropped);
      NaN when every difference is zero or n < 2.
    - ``cohens_dz = mean(d) / sd(d)``.
    NaN where a statistic is undefined (n < 2, or sd(d) = 0 for t and dz).
    """
    n = d.size
    lo, hi = percentile_ci(bootstrap_means(d, n_boot, seed), level)
    sd = float(d.std(ddof=1)) if n > 1 else np.nan
    out = {"mean_diff": float(d.mean()), "std_diff": sd, "ci_low": float(lo), "ci_high": float(hi)}
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        if n > 1:
            t = sps.ttest_1samp(d, 0.0)
            out["t_stat"], out["p_t"] = float(t.statistic), float(t.pvalue)
        else:
            out["t_stat"] = out["p_t"] = np.nan
        if n > 1 and np.any(d != 0):
            try:
                w = sps.wilcoxon(d)
                out["w_stat"], out["p_wilcoxon"] = float(w.statistic), float(w.pvalue)
            except ValueError:
                out["w_stat"] = out["p_wilcoxon"] = np.nan
        else:
            out["w_stat"] = out["p_wilcoxon"] = np.nan
        out["cohens_dz"] = float(d.mean() / sd) if n > 1 and sd > 0 else np.nan
    return out


def paired_test(
    df: pd.DataFrame,
    a: Cell = ("fap-synergy", 50),
    b: Cell = ("fap", 75),
    value: str = "kl",
    seeds: Sequence[int] | None = None,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> PairedTestResult:
    """Compare cell ``a = (method, K)`` with cell ``b`` prompt by prompt (matched on seed, prompt_idx).

    Formulas: see :func:`paired_stats` (d = a - b; for KL, negative = a retains behaviour better).

    Args:
        df: results table. a, b: ``(method, k)`` cells. value: column compared.
        seeds: restrict to these seeds (default: all). n_boot, seed, level: bootstrap settings.
    Returns:
        :class:`PairedTestResult`; ``diffs`` holds ``seed, prompt_idx, a, b, diff`` per prompt.
    Raises:
        MissingResultError: a method / K / seed is absent. UnpairedDataError: units differ.
    """
    pair = paired_cells(df, a, b, value, seeds)
    d = (pair["a"] - pair["b"]).to_numpy()
    st = paired_stats(d, n_boot, seed, level)
    diffs = pair.assign(diff=d).reset_index()
    return PairedTestResult(
        a=(a[0], int(a[1])),
        b=(b[0], int(b[1])),
        value=value,
        n=int(d.size),
        n_seeds=int(diffs["seed"].nunique()),
        mean_a=float(pair["a"].mean()),
        mean_b=float(pair["b"].mean()),
        level=level,
        diffs=diffs,
        **st,
    )


def matched_seed_ablation(
    df: pd.DataFrame,
    full: str = "fap-synergy",
    ablated: str = "fap",
    ks: Sequence[int] | None = None,
    value: str = "kl",
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> pd.DataFrame:
    """Effect of the reranking alone: ``ablated - full`` per prompt, per K and seed, plus pooled.

    ``full`` and ``ablated`` differ only in the reranking; same seeds and same prompts, so each
    difference ``d_i = x_ablated(i) - x_full(i)`` isolates it (for KL, d > 0 = reranking helps).

    Rows with ``scope="seed"``: one per (K, seed), statistics of :func:`paired_stats` over that
    seed's prompts. Rows with ``scope="pooled"`` (``seed`` = <NA>): one per K over all units,
    plus the seed-level view: ``seed_mean_diff`` / ``seed_std_diff`` = mean / sd (ddof=1) of the
    per-seed mean differences and ``p_seed_t`` = one-sample t-test of those means against 0
    (NaN with fewer than 2 seeds). At K where the two methods select identically (FAP-Synergy at
    K >= 400 in the paper's settings) every d is 0 and the tests are NaN.

    Args:
        df: results. full, ablated: method names. ks: budgets (default: every K both methods have).
        value: compared column. n_boot, seed, level: bootstrap settings.
    Returns:
        DataFrame ``k, scope, seed, n, mean_full, mean_ablated, mean_diff, std_diff, ci_low,
        ci_high, t_stat, p_t, w_stat, p_wilcoxon, cohens_dz, seed_mean_diff, seed_std_diff, p_seed_t``.
    Raises:
        MissingResultError: a method or K is absent. UnpairedDataError: seeds/prompts differ.
    """
    check_columns(df, ["method", "k", "seed", "prompt_idx", value])
    check_cell(df, full)
    check_cell(df, ablated)
    if ks is None:
        k_full = set(df.loc[df["method"] == full, "k"].tolist())
        k_abl = set(df.loc[df["method"] == ablated, "k"].tolist())
        ks = sorted(k_full & k_abl)
        if not ks:
            raise MissingResultError(
                f"{full!r} (K={sorted(k_full)}) and {ablated!r} (K={sorted(k_abl)}) share no budget K"
            )
    rows = []
    for k in ks:
        pair = paired_cells(df, (ablated, int(k)), (full, int(k)), value)
        d_all = (pair["a"] - pair["b"]).to_numpy()
        seeds_of = pair.index.get_level_values("seed").to_numpy()
        seed_ids = np.unique(seeds_of)
        seed_means = []
        for s in seed_ids:
            m = seeds_of == s
            st = paired_stats(d_all[m], n_boot, seed, level)
            seed_means.append(st["mean_diff"])
            rows.append(
                {"k": int(k), "scope": "seed", "seed": int(s), "n": int(m.sum()),
                 "mean_full": float(pair["b"][m].mean()), "mean_ablated": float(pair["a"][m].mean()), **st}
            )
        sm = np.asarray(seed_means)
        st = paired_stats(d_all, n_boot, seed, level)
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            p_seed = float(sps.ttest_1samp(sm, 0.0).pvalue) if sm.size > 1 and np.any(sm != sm[0]) else np.nan
        rows.append(
            {"k": int(k), "scope": "pooled", "seed": pd.NA, "n": int(d_all.size),
             "mean_full": float(pair["b"].mean()), "mean_ablated": float(pair["a"].mean()), **st,
             "seed_mean_diff": float(sm.mean()),
             "seed_std_diff": float(sm.std(ddof=1)) if sm.size > 1 else np.nan,
             "p_seed_t": p_seed}
        )
    out = pd.DataFrame(rows)
    out["seed"] = out["seed"].astype("Int64")
    out.attrs.update(value=value, full=full, ablated=ablated, level=level, n_boot=n_boot, seed=seed)
    return out
