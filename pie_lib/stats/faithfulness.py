"""MIB faithfulness and completeness as ratios of means, and CPR / CMD on that aggregate.

MIB (and spec §3) define a circuit's faithfulness at one budget from the *mean* metrics:

    F = (mean m_circuit - mean m_null) / (mean m_clean - mean m_null)
    C = (mean m_complement - mean m_null) / (mean m_clean - mean m_null)

The mean of per-prompt ratios is a different, ill-conditioned quantity: a prompt whose clean and
null metrics nearly coincide has a denominator near 0 and a ratio anywhere. The per-prompt ratios
stay available (:func:`per_prompt_ratios`), with prompts whose ``|m_clean - m_null| < min_gap``
flagged and counted in every aggregate row.

Means are over the prompt as unit (:mod:`pie_lib.stats.design`): a prompt's metrics are first
averaged over the seeds that share it. Intervals: BCa bootstrap of the ratio (prompts resampled
as clusters; seed-specific prompts hierarchically), with the jackknife of the ratio for the
acceleration.

CPR / CMD (MIB): the areas under F(x) and under |1 - F(x)| over the circuit-size fraction x, by
the trapezoid rule, on a *fraction* ladder (``budget == "frac"`` rows, ``k`` = fraction of each
prompt's active set) that must reach x = 1.0 -- no point is invented at the top. The empty
circuit is the null circuit, so F(0) = 0 exactly; that anchor is a definition, not an
interpolation. CIs of the areas resample whole prompts, the same units at every fraction.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import pandas as pd

from pie_lib.errors import BudgetError
from pie_lib.stats._frame import check_columns, values_of
from pie_lib.stats.design import detect_design, prompt_id_column, unit_matrix
from pie_lib.stats.resample import bca_interval, shrunk_values, unit_weights

Which = Literal["faithfulness", "completeness"]
_NUMERATOR = {"faithfulness": "m_circuit", "completeness": "m_complement"}


def _trapezoid(y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Trapezoid areas of ``y`` ``[..., L]`` over ``x`` ``[L]`` (numpy 1.x and 2.x)."""
    return (0.5 * (y[..., 1:] + y[..., :-1]) * np.diff(x)).sum(axis=-1)


def per_prompt_ratios(df: pd.DataFrame, which: Which = "faithfulness", min_gap: float = 0.1) -> pd.DataFrame:
    """Per-row ratios ``(m_x - m_null) / (m_clean - m_null)`` with small-denominator rows flagged.

    Returns:
        ``df``'s rows with ``gap = m_clean - m_null``, ``ratio`` (NaN where gap = 0) and
        ``small_gap = |gap| < min_gap``.
    """
    num = _NUMERATOR[which]
    check_columns(df, ["m_clean", "m_null", num])
    gap = df["m_clean"].to_numpy(dtype=np.float64) - df["m_null"].to_numpy(dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(
            gap != 0, (df[num].to_numpy(dtype=np.float64) - df["m_null"].to_numpy(dtype=np.float64)) / gap, np.nan
        )
    return df.assign(gap=gap, ratio=ratio, small_gap=np.abs(gap) < min_gap)


def _ratio_ci(
    num: np.ndarray, den: np.ndarray, g: np.ndarray, n_boot: int, seed: int, level: float
) -> tuple[np.ndarray, np.ndarray]:
    """BCa interval of ``sum num / sum den`` over units (``num``, ``den`` ``[n, ...]``)."""
    n = num.shape[0]
    w = unit_weights(g, n_boot, seed)
    nf, df_ = shrunk_values(num, g).reshape(n, -1), shrunk_values(den, g).reshape(n, -1)
    with np.errstate(divide="ignore", invalid="ignore"):
        boot = (w @ nf) / (w @ df_)
        jack = (nf.sum(0) - nf) / (df_.sum(0) - df_)
        theta = nf.sum(0) / df_.sum(0)
    lo, hi = bca_interval(theta, boot, jack, level)
    return lo.reshape(num.shape[1:]), hi.reshape(num.shape[1:])


def mib_faithfulness(
    df: pd.DataFrame,
    by: Sequence[str] = ("method", "budget", "k"),
    which: Which = "faithfulness",
    min_gap: float = 0.1,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> pd.DataFrame:
    """MIB faithfulness (or completeness) per group as a ratio of means, with its BCa interval.

    Args:
        df: sweep rows (``m_clean, m_null, m_circuit, m_complement, seed, prompt_idx``, ``by``).
        by: grouping columns (default one row per method and budget). which: the metric.
        min_gap: prompts with ``|m_clean - m_null| < min_gap`` (metric units, e.g. logits) are
            counted in ``n_small_gap``; they stay in the ratio of means, where they cannot blow up.
        n_boot, seed, level: bootstrap settings (``n_boot=0``: no interval).
    Returns:
        DataFrame ``*by, n_prompts, n_seeds, unit, design, <which>, ci_low, ci_high,
        mean_clean_gap, mean_of_ratios, median_of_ratios, n_small_gap, n_undefined`` (the
        per-prompt ratios' mean / median over units with a defined ratio; ``n_undefined`` = units
        with gap exactly 0).
    """
    by = list(by)
    num_col = _NUMERATOR[which]
    check_columns(df, [*by, "seed", "prompt_idx", "m_clean", "m_null", num_col])
    idcol = prompt_id_column(df)
    rows = []
    for key, g in df.sort_values([*by, "seed", "prompt_idx"], kind="stable").groupby(by, sort=True):
        design = detect_design(
            g["seed"].to_numpy(), g["prompt_idx"].to_numpy(), g[idcol].to_numpy() if idcol else None, idcol
        )
        m = np.column_stack([values_of(g, "m_clean"), values_of(g, "m_null"), values_of(g, num_col)])
        u = unit_matrix(m, design)  # [n_units, 3]
        num, den = u[:, 2] - u[:, 1], u[:, 0] - u[:, 1]
        with np.errstate(divide="ignore", invalid="ignore"):
            value = float(num.sum() / den.sum())
            ratios = np.where(den != 0, num / den, np.nan)
        if num.size > 1 and n_boot > 0:
            lo, hi = _ratio_ci(num, den, design.unit_groups(), n_boot, seed, level)
        else:  # n_boot=0: the point estimate only
            lo, hi = np.nan, np.nan
        rows.append(
            {
                **dict(zip(by, key if isinstance(key, tuple) else (key,))),
                **design.info(),
                which: value,
                "ci_low": float(lo),
                "ci_high": float(hi),
                "mean_clean_gap": float(den.mean()),
                "mean_of_ratios": float(np.nanmean(ratios)) if np.isfinite(ratios).any() else np.nan,
                "median_of_ratios": float(np.nanmedian(ratios)) if np.isfinite(ratios).any() else np.nan,
                "n_small_gap": int((np.abs(den) < min_gap).sum()),
                "n_undefined": int((den == 0).sum()),
            }
        )
    out = pd.DataFrame(rows)
    out.attrs.update(which=which, min_gap=min_gap, level=level, n_boot=n_boot, seed=seed)
    return out


def mib_cpr_cmd(
    df: pd.DataFrame,
    methods: Sequence[str] | None = None,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
    min_gap: float = 0.1,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """CPR and CMD per method on the ratio-of-means faithfulness over a fraction ladder reaching 1.0.

    Args:
        df: sweep rows with ``budget == "frac"`` (``k`` = fraction in (0, 1]); absolute rows are ignored.
        methods: methods to score (default: all with fraction rows). n_boot, seed, level: bootstrap.
        min_gap: see :func:`mib_faithfulness` (the count is reported per method).
    Returns:
        ``(areas, curve)``: ``areas`` = ``method, cpr, cpr_ci_low, cpr_ci_high, cmd, cmd_ci_low,
        cmd_ci_high, n_points, n_prompts, n_seeds, unit, design, n_small_gap``; ``curve`` =
        ``method, size_frac, faithfulness, ci_low, ci_high`` (the aggregate F at each fraction,
        with the F(0) = 0 anchor).
    Raises:
        BudgetError: no fraction rows, or a method's ladder does not reach 1.0 (rerun with
            ``--k-frac ...,1.0``), or its fractions do not cover the same prompts.
    """
    check_columns(df, ["method", "k", "budget", "seed", "prompt_idx", "m_clean", "m_null", "m_circuit"])
    d = df.loc[df["budget"] == "frac"]
    if d.empty:
        raise BudgetError("no fraction-ladder rows (budget == 'frac'); run pie prune with --k-frac 0.01,...,1.0")
    idcol = prompt_id_column(d)
    methods = sorted(d["method"].unique()) if methods is None else list(methods)
    areas, curves = [], []
    for method in methods:
        dm = d.loc[d["method"] == method]
        if dm.empty:
            raise BudgetError(
                f"method {method!r} has no fraction-ladder rows; methods with them: {sorted(d['method'].unique())}"
            )
        fracs = np.sort(dm["k"].astype(float).unique())
        if not np.isclose(fracs[-1], 1.0):
            raise BudgetError(
                f"method {method!r}: the fraction ladder stops at {fracs[-1]:g}; CPR/CMD need it to "
                "reach 1.0 (add 1.0 to --k-frac) rather than an assumed end point"
            )
        wide = dm.pivot_table(index=["seed", "prompt_idx"], columns="k", values="m_circuit", aggfunc="first")
        if wide.isna().any().any():
            raise BudgetError(f"method {method!r}: its fractions do not all cover the same (seed, prompt) rows")
        base = dm.drop_duplicates(["seed", "prompt_idx"]).set_index(["seed", "prompt_idx"]).loc[wide.index]
        design = detect_design(
            wide.index.get_level_values(0).to_numpy(),
            wide.index.get_level_values(1).to_numpy(),
            base[idcol].to_numpy() if idcol else None,
            idcol,
        )
        g = design.unit_groups()
        clean = unit_matrix(base["m_clean"].to_numpy(dtype=np.float64), design)
        null = unit_matrix(base["m_null"].to_numpy(dtype=np.float64), design)
        circ = unit_matrix(wide[fracs].to_numpy(dtype=np.float64), design)  # [n_units, L]
        num, den = circ - null[:, None], clean - null  # [n, L], [n]
        x = np.concatenate([[0.0], fracs])

        def areas_of(sum_num: np.ndarray, sum_den: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            f = sum_num / sum_den[..., None]
            f = np.concatenate([np.zeros((*f.shape[:-1], 1)), f], axis=-1)
            return _trapezoid(f, x), _trapezoid(np.abs(1.0 - f), x)

        with np.errstate(divide="ignore", invalid="ignore"):
            cpr, cmd = areas_of(num.sum(0), np.asarray(den.sum()))
            w = unit_weights(g, n_boot, seed)
            ns, ds = shrunk_values(num, g), shrunk_values(den, g)
            b_cpr, b_cmd = areas_of(w @ ns, w @ ds)
            j_cpr, j_cmd = areas_of(num.sum(0) - num, den.sum() - den)
        c_lo, c_hi = bca_interval(cpr, b_cpr, j_cpr, level)
        m_lo, m_hi = bca_interval(cmd, b_cmd, j_cmd, level)
        f_lo, f_hi = _ratio_ci(num, np.repeat(den[:, None], num.shape[1], axis=1), g, n_boot, seed, level)
        areas.append(
            {
                "method": method,
                "cpr": float(cpr),
                "cpr_ci_low": float(c_lo),
                "cpr_ci_high": float(c_hi),
                "cmd": float(cmd),
                "cmd_ci_low": float(m_lo),
                "cmd_ci_high": float(m_hi),
                "n_points": int(fracs.size),
                **design.info(),
                "n_small_gap": int((np.abs(den) < min_gap).sum()),
            }
        )
        with np.errstate(divide="ignore", invalid="ignore"):
            f_hat = num.sum(0) / den.sum()
        curves.append(
            pd.DataFrame(
                {
                    "method": method,
                    "size_frac": x,
                    "faithfulness": np.r_[0.0, f_hat],
                    "ci_low": np.r_[0.0, f_lo],
                    "ci_high": np.r_[0.0, f_hi],
                }
            )
        )
    curve = pd.concat(curves, ignore_index=True) if curves else pd.DataFrame()
    return pd.DataFrame(areas), curve
