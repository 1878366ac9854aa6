"""MIB circuit metrics from a sweep's results table: faithfulness curves, CPR and CMD (spec §10).

Input: the rows of :func:`pie_lib.prune.sweep.run_prune` (columns ``method, k, budget, seed,
prompt_idx, n_active, k_eff, faithfulness``; other columns are ignored).

- Circuit size of a row = ``k_eff / n_active`` (clipped to [0, 1]): the fraction of the prompt's
  active occurrences the circuit keeps.
- Faithfulness f = (m(circuit) - m(null)) / (m(clean) - m(null)) (spec §3). Rows whose f is NaN
  (clean and null metric coincide) are dropped.
- **CPR** = ∫_0^1 f(x) dx (higher is better), **CMD** = ∫_0^1 |1 - f(x)| dx (lower is better),
  both by the trapezoid rule over the ladder points sorted by size (points of equal size are
  averaged first). CMD applies the trapezoid rule to |1 - f| at the points (a crossing of f = 1
  between two points is not split), as the MIB reference does.
- End points (MIB convention, ``anchors=True``): the curve is completed with the empty circuit
  (0, f_null = 0) and the full circuit (1, f_full = 1) when the ladder does not reach them, so
  areas always span [0, 1] and methods with different ladders are comparable. With
  ``anchors=False`` the area covers only the measured range [x_min, x_max] (not rescaled).
- ``level="prompt"`` (default): one curve per (method, seed, prompt); CPR / CMD are the mean and
  std over those curves. ``level="mean"``: one curve per method from the per-(budget, k) means of
  size and faithfulness (MIB's aggregate curve).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, cast

import numpy as np

from pie_lib.errors import DataFormatError

if TYPE_CHECKING:  # the tables come from callers that have pandas; importing this module needs none
    import pandas as pd

# numpy >= 2.0 calls it trapezoid; numpy 1.26 (still supported) has only trapz, which 2.x stubs no longer declare
_trapezoid = np.trapezoid if hasattr(np, "trapezoid") else np.trapz  # pyright: ignore[reportAttributeAccessIssue]

Level = Literal["prompt", "mean"]
NEEDED = ("method", "k", "budget", "seed", "prompt_idx", "n_active", "k_eff", "faithfulness")


def _prepare(df: pd.DataFrame, budgets: tuple[str, ...] | None) -> pd.DataFrame:
    missing = [c for c in NEEDED if c not in df.columns]
    if missing:
        raise DataFormatError(f"results table lacks column(s) {missing}; expected the rows of run_prune")
    d = df.loc[:, list(NEEDED)].copy()
    if budgets is not None:
        d = d[d.budget.isin(budgets)]
    d["faithfulness"] = d.faithfulness.astype(float)
    d = d[np.isfinite(d.faithfulness) & (d.n_active.astype(float) > 0)]
    d["size_frac"] = (d.k_eff.astype(float) / d.n_active.astype(float)).clip(0.0, 1.0)
    return d


def faithfulness_curve(
    df: pd.DataFrame, budgets: tuple[str, ...] | None = None, by_prompt: bool = False
) -> pd.DataFrame:
    """Faithfulness at each ladder point.

    Args:
        df: sweep rows; budgets: restrict to "abs" and/or "frac" rows (default both).
        by_prompt: return every row's (size_frac, faithfulness) instead of the means.
    Returns:
        tidy DataFrame sorted by method and size: ``method, budget, k, size_frac, faithfulness,
        faithfulness_std, n`` (means over prompts and seeds), or with ``by_prompt`` ``method,
        seed, prompt_idx, budget, k, size_frac, faithfulness``.
    """
    d = _prepare(df, budgets)
    if by_prompt:
        cols = ["method", "seed", "prompt_idx", "budget", "k", "size_frac", "faithfulness"]
        return (
            cast("pd.DataFrame", d[cols])
            .sort_values(["method", "seed", "prompt_idx", "size_frac"])
            .reset_index(drop=True)
        )
    g = d.groupby(["method", "budget", "k"], sort=False)
    out = g.agg(
        size_frac=("size_frac", "mean"),
        faithfulness=("faithfulness", "mean"),
        faithfulness_std=("faithfulness", "std"),
        n=("faithfulness", "size"),
    ).reset_index()
    return out.sort_values(["method", "size_frac", "budget", "k"]).reset_index(drop=True)


def curve_areas(
    x: np.ndarray, f: np.ndarray, anchors: bool = True, f_null: float = 0.0, f_full: float = 1.0
) -> tuple[float, float]:
    """(CPR, CMD) of one curve: trapezoid areas under f and under |1 - f| over size fractions x.

    Points of equal x are averaged; with ``anchors`` the points (0, f_null) and (1, f_full) are
    added where the curve does not already reach x = 0 or x = 1. A single point without anchors
    has zero area.
    """
    x = np.clip(np.asarray(x, dtype=float), 0.0, 1.0)
    f = np.asarray(f, dtype=float)
    if x.size == 0:
        return float("nan"), float("nan")
    ux, inv = np.unique(x, return_inverse=True)
    uf = np.bincount(inv, weights=f) / np.bincount(inv)
    if anchors:
        if ux[0] > 0.0:
            ux, uf = np.concatenate([[0.0], ux]), np.concatenate([[f_null], uf])
        if ux[-1] < 1.0:
            ux, uf = np.concatenate([ux, [1.0]]), np.concatenate([uf, [f_full]])
    cpr = float(_trapezoid(uf, ux))
    dev = np.abs(1.0 - uf)
    cmd = float(_trapezoid(dev, ux))
    return cpr, cmd


def cpr_cmd(
    df: pd.DataFrame,
    level: Level = "prompt",
    anchors: bool = True,
    f_null: float = 0.0,
    f_full: float = 1.0,
    budgets: tuple[str, ...] | None = None,
) -> pd.DataFrame:
    """CPR (area under faithfulness vs size) and CMD (area under |1 - f|) per method.

    Args:
        df: sweep rows. level: "prompt" (per-prompt curves, mean ± std) or "mean" (one curve of
            ladder means). anchors, f_null, f_full: end-point convention (module docstring).
        budgets: restrict to "abs" and/or "frac" rows (default both, merged into one curve).
    Returns:
        DataFrame ``method, cpr, cpr_std, cmd, cmd_std, n_curves, n_points, level`` (std NaN for
        level "mean"; n_points = mean ladder points per curve before anchoring).
    """
    if level not in ("prompt", "mean"):
        raise ValueError(f"level {level!r}; use 'prompt' or 'mean'")
    rows = []
    if level == "prompt":
        d = _prepare(df, budgets)
        for method, dm in d.groupby("method", sort=True):
            areas = [
                (
                    *curve_areas(c.size_frac.values, c.faithfulness.values, anchors, f_null, f_full),
                    c.size_frac.nunique(),
                )
                for _, c in dm.groupby(["seed", "prompt_idx"], sort=True)
            ]
            a = np.array(areas, dtype=float)
            rows.append(
                dict(
                    method=method,
                    cpr=a[:, 0].mean(),
                    cpr_std=a[:, 0].std(ddof=1) if len(a) > 1 else np.nan,
                    cmd=a[:, 1].mean(),
                    cmd_std=a[:, 1].std(ddof=1) if len(a) > 1 else np.nan,
                    n_curves=len(a),
                    n_points=a[:, 2].mean(),
                    level=level,
                )
            )
    else:
        curve = faithfulness_curve(df, budgets)
        for method, c in curve.groupby("method", sort=True):
            cpr, cmd = curve_areas(c.size_frac.values, c.faithfulness.values, anchors, f_null, f_full)
            rows.append(
                dict(
                    method=method,
                    cpr=cpr,
                    cpr_std=np.nan,
                    cmd=cmd,
                    cmd_std=np.nan,
                    n_curves=1,
                    n_points=float(c.size_frac.nunique()),
                    level=level,
                )
            )
    import pandas as pd

    cols = ["method", "cpr", "cpr_std", "cmd", "cmd_std", "n_curves", "n_points", "level"]
    return pd.DataFrame(rows, columns=cols)


__all__ = ["cpr_cmd", "curve_areas", "faithfulness_curve"]
