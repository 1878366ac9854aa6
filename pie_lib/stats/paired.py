"""Paired comparisons of two (method, K) cells over the same prompts, and the reranking ablation.

Rows are matched on ``(seed, prompt_idx)``, ``d = x_a - x_b`` per row; every test is then over
independent units (:mod:`pie_lib.stats.design`): with shared prompts a prompt's difference is its
mean over seeds (the seeds' copies of one prompt are not evidence), with seed-specific prompts the
seeds are a level above the prompts and add their own variance component.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, cast

import numpy as np
import pandas as pd
from scipy import stats as sps

from pie_lib.stats._frame import Cell, MissingResultError, check_cell, check_columns, paired_units
from pie_lib.stats.design import Design, detect_design, seed_spread, unit_matrix
from pie_lib.stats.resample import log_values, mean_ci, mean_t


class _TestResult(Protocol):
    """What scipy's test results (``WilcoxonResult``, ``TtestResult``) hold; their stubs omit it."""

    statistic: float
    pvalue: float


@dataclass(frozen=True)
class PairedTestResult:
    """Paired comparison of cell ``a`` against cell ``b`` on ``value`` (d = a - b per prompt).

    ``n`` = ``n_prompts`` (independent prompts), ``n_rows`` = matched rows; ``unit`` / ``design``
    say how rows became units (:mod:`pie_lib.stats.design`).
    """

    a: Cell
    b: Cell
    value: str
    n: int
    n_prompts: int
    n_seeds: int
    n_rows: int
    unit: str
    design: str
    mean_a: float
    mean_b: float
    mean_diff: float
    std_diff: float
    se_diff: float
    dof: float
    ci_low: float
    ci_high: float
    level: float
    t_stat: float
    p_t: float
    w_stat: float
    p_wilcoxon: float
    cohens_dz: float
    seed_sd_diff: float
    gm_ratio: float
    gm_ratio_ci_low: float
    gm_ratio_ci_high: float
    diffs: pd.DataFrame = field(repr=False, compare=False)

    def as_row(self) -> dict[str, object]:
        """The scalar fields as one table row (``diffs`` left out)."""
        return {k: v for k, v in self.__dict__.items() if k != "diffs"}


def paired_unit_stats(d: np.ndarray, design: Design, n_boot: int, seed: int, level: float) -> dict[str, float]:
    """Statistics of paired row differences ``d`` ``[n_rows]`` over the units of ``design``.

    With ``u`` the per-unit differences (:func:`~pie_lib.stats.design.unit_matrix`) and strata
    ``g`` (:meth:`~pie_lib.stats.design.Design.unit_groups`):

    - ``mean_diff = mean(u)``, ``std_diff = sd(u)`` (ddof=1, between units);
    - ``se_diff, dof``: :func:`~pie_lib.stats.resample.mean_t` (``sd(u)/sqrt(n)``, n-1 with one
      stratum; random-effects SE and Satterthwaite df with seed-specific prompts);
    - ``t_stat = mean / se``, ``p_t`` two-sided Student t with ``dof`` (with one seed: equal to
      ``scipy.stats.ttest_rel(a, b)``);
    - ``ci_low, ci_high``: BCa bootstrap interval of the mean difference (unit-aware);
    - ``w_stat, p_wilcoxon``: Wilcoxon signed-rank test of ``u`` (zero differences dropped; NaN
      when every difference is zero or n < 2; it ignores the seed level of seed-specific prompts);
    - ``cohens_dz = mean(u) / sd(u)``; ``seed_sd_diff``: the seed component of d
      (:func:`~pie_lib.stats.design.seed_spread`).
    NaN where a statistic is undefined (n < 2, or a zero standard error for t and dz).
    """
    u = unit_matrix(d, design)
    g = design.unit_groups()
    n = u.size
    t = mean_t(u, g)
    lo, hi = mean_ci(u, g, n_boot, seed, level)
    out = {
        "mean_diff": t.mean,
        "std_diff": t.sd_units,
        "se_diff": t.se,
        "dof": t.dof,
        "ci_low": float(lo),
        "ci_high": float(hi),
    }
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        if n > 1 and t.se > 0:
            out["t_stat"] = t.mean / t.se
            out["p_t"] = float(2 * sps.t.sf(abs(out["t_stat"]), t.dof))
        else:
            out["t_stat"] = out["p_t"] = np.nan
        if n > 1 and np.any(u != 0):
            try:
                w = cast(_TestResult, sps.wilcoxon(u))
                out["w_stat"], out["p_wilcoxon"] = float(w.statistic), float(w.pvalue)
            except ValueError:
                out["w_stat"] = out["p_wilcoxon"] = np.nan
        else:
            out["w_stat"] = out["p_wilcoxon"] = np.nan
        out["cohens_dz"] = float(t.mean / t.sd_units) if n > 1 and t.sd_units > 0 else np.nan
    out["seed_sd_diff"] = seed_spread(d, design)
    return out


def paired_stats(d: np.ndarray, n_boot: int, seed: int, level: float) -> dict[str, float]:
    """:func:`paired_unit_stats` of ``d`` ``[n]`` taken as n independent prompts of one seed."""
    d = np.asarray(d, dtype=np.float64)
    design = detect_design(np.zeros(d.size, dtype=np.int64), np.arange(d.size))
    return paired_unit_stats(d, design, n_boot, seed, level)


def log_ratio_ci(
    a: np.ndarray, b: np.ndarray, design: Design, n_boot: int, seed: int, level: float
) -> tuple[float, float, float]:
    """Ratio of geometric means ``exp(mean_units(log a - log b))`` with its exponentiated BCa interval.

    Returns NaNs when a value of either side is <= 0 (the log scale is undefined; nothing is floored).
    """
    la, _ = log_values(a)
    lb, _ = log_values(b)
    if la is None or lb is None:
        return np.nan, np.nan, np.nan
    u = unit_matrix(la - lb, design)
    lo, hi = mean_ci(u, design.unit_groups(), n_boot, seed, level)
    return float(np.exp(u.mean())), float(np.exp(lo)), float(np.exp(hi))


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
    """Compare cell ``a = (method, K)`` with cell ``b`` prompt by prompt, on the prompt as unit.

    Formulas: see :func:`paired_unit_stats` (d = a - b; for KL, negative = a retains behaviour
    better). ``gm_ratio`` = ratio of geometric means of a over b with its BCa interval (the
    log-scale comparison for heavy-tailed KL; NaN if a value is <= 0).

    Args:
        df: results table. a, b: ``(method, k)`` cells. value: column compared.
        seeds: restrict to these seeds (default: all). n_boot, seed, level: bootstrap settings.
    Returns:
        :class:`PairedTestResult`; ``diffs`` holds ``seed, prompt_idx, a, b, diff`` per row.
    Raises:
        MissingResultError: a method / K / seed is absent. UnpairedDataError: units differ.
    """
    pair, design = paired_units(df, a, b, value, seeds)
    xa, xb = pair["a"].to_numpy(), pair["b"].to_numpy()
    d = xa - xb
    st = paired_unit_stats(d, design, n_boot, seed, level)
    gm, glo, ghi = log_ratio_ci(xa, xb, design, n_boot, seed, level)
    diffs = pair.assign(diff=d).reset_index()
    return PairedTestResult(
        a=(a[0], int(a[1])),
        b=(b[0], int(b[1])),
        value=value,
        n=design.n_prompts,
        n_prompts=design.n_prompts,
        n_seeds=design.n_seeds,
        n_rows=design.n_rows,
        unit=design.unit,
        design=design.case,
        mean_a=float(unit_matrix(xa, design).mean()),
        mean_b=float(unit_matrix(xb, design).mean()),
        level=level,
        diffs=diffs,
        gm_ratio=gm,
        gm_ratio_ci_low=glo,
        gm_ratio_ci_high=ghi,
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
    difference ``d = x_ablated - x_full`` isolates it (for KL, d > 0 = reranking helps).

    Rows with ``scope="seed"``: one per (K, seed), :func:`paired_unit_stats` over that seed's
    prompts. Rows with ``scope="pooled"`` (``seed`` = <NA>): one per K over all seeds, on the
    right unit (:mod:`pie_lib.stats.design`: shared prompts average their seeds first), with
    ``seed_sd_diff`` = the seed component of d beside the between-prompt interval, and the
    per-seed view ``seed_mean_diff`` / ``seed_std_diff`` (mean / sd of the per-seed mean differences).

    ``p_seed_t`` (one-sample t of the per-seed mean differences, S-1 df) is reported only for
    seed-specific prompts, where the seed means are independent replicates; it is NaN when the
    seeds share prompts, because the spread of their means is then only draw noise on the same
    prompts and the test rejects a true null far more often than its level.
    At K where the two methods select identically every d is 0 and the tests are NaN.

    Args:
        df: results. full, ablated: method names. ks: budgets (default: every K both methods have).
        value: compared column. n_boot, seed, level: bootstrap settings.
    Returns:
        DataFrame ``k, scope, seed, n, n_prompts, n_seeds, unit, design, mean_full, mean_ablated,
        mean_diff, std_diff, se_diff, dof, ci_low, ci_high, t_stat, p_t, w_stat, p_wilcoxon,
        cohens_dz, seed_sd_diff, seed_mean_diff, seed_std_diff, p_seed_t``.
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
        pair, design = paired_units(df, (ablated, int(k)), (full, int(k)), value)
        d_all = (pair["a"] - pair["b"]).to_numpy()
        seeds_of = pair.index.get_level_values("seed").to_numpy()
        pidx = pair.index.get_level_values("prompt_idx").to_numpy()
        seed_ids = np.unique(seeds_of)
        seed_means = []
        for s in seed_ids:
            m = seeds_of == s
            one = detect_design(seeds_of[m], pidx[m])
            st = paired_unit_stats(d_all[m], one, n_boot, seed, level)
            seed_means.append(st["mean_diff"])
            rows.append(
                {
                    "k": int(k),
                    "scope": "seed",
                    "seed": int(s),
                    "n": int(m.sum()),
                    **one.info(),
                    "mean_full": float(pair["b"][m].mean()),
                    "mean_ablated": float(pair["a"][m].mean()),
                    **st,
                }
            )
        sm = np.asarray(seed_means)
        st = paired_unit_stats(d_all, design, n_boot, seed, level)
        p_seed = np.nan
        if design.nested and sm.size > 1 and np.any(sm != sm[0]):
            with warnings.catch_warnings(), np.errstate(all="ignore"):
                warnings.simplefilter("ignore")
                p_seed = float(cast(_TestResult, sps.ttest_1samp(sm, 0.0)).pvalue)
        rows.append(
            {
                "k": int(k),
                "scope": "pooled",
                "seed": pd.NA,
                "n": design.n_prompts,
                **design.info(),
                "mean_full": float(unit_matrix(pair["b"].to_numpy(), design).mean()),
                "mean_ablated": float(unit_matrix(pair["a"].to_numpy(), design).mean()),
                **st,
                "seed_mean_diff": float(sm.mean()),
                "seed_std_diff": float(sm.std(ddof=1)) if sm.size > 1 else np.nan,
                "p_seed_t": p_seed,
            }
        )
    out = pd.DataFrame(rows)
    out["seed"] = out["seed"].astype("Int64")
    out.attrs.update(value=value, full=full, ablated=ablated, level=level, n_boot=n_boot, seed=seed)
    return out
