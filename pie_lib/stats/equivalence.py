"""TOST: two one-sided paired t-tests for equivalence of two (method, K) cells, on the prompt as unit.

Behind the paper's Effective-Budget claim "FAP-Synergy at K=50 matches the baselines at K=75"
(spec §3, §9): absence of a significant difference is not evidence of equivalence; TOST tests
``H0: mu_d <= lower or mu_d >= upper`` against ``H1: lower < mu_d < upper`` directly.

Margins are pre-specified, never estimated from the data by default: ``margin`` in the value's
own units (KL), and ``ratio_margin`` r for the log scale -- geometric-mean KL of a within
``x(1 - r, 1 + r)`` of b's. Beside the verdict every result gives the *equivalence bound*: the
smallest margin at which equivalence would have been declared on these data.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TypedDict

import numpy as np
import pandas as pd
from scipy import stats as sps

from pie_lib.stats._frame import Cell, paired_units
from pie_lib.stats.design import unit_matrix
from pie_lib.stats.resample import log_values, mean_t


class _RatioFields(TypedDict):
    """The log-scale (ratio) fields of :class:`TostResult`."""

    gm_ratio: float
    ratio_ci_low: float
    ratio_ci_high: float
    ratio_p_value: float
    ratio_equivalent: bool
    ratio_bound: float


def tost_bounds(mean: float, se: float, dof: float, lower: float, upper: float, alpha: float) -> dict[str, float]:
    """Schuirmann's TOST of a mean with standard error ``se`` and ``dof`` against ``(lower, upper)``.

    - ``t_lower = (mean - lower) / se``, ``p_lower = 1 - T(t_lower)`` (H0: mu <= lower);
    - ``t_upper = (mean - upper) / se``, ``p_upper = T(t_upper)`` (H0: mu >= upper);
    - ``p_value = max(p_lower, p_upper)``; equivalence iff ``p_value < alpha``, which is the
      ``1 - 2 alpha`` interval ``mean ± t_{1-alpha, dof} se`` lying inside ``(lower, upper)``;
    - ``ci_low, ci_high`` that interval. T = Student t CDF with ``dof``.
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        t_lo = (mean - lower) / se if se > 0 else np.copysign(np.inf, mean - lower)
        t_up = (mean - upper) / se if se > 0 else np.copysign(np.inf, mean - upper)
    p_lo, p_up = float(sps.t.sf(t_lo, dof)), float(sps.t.cdf(t_up, dof))
    half = float(sps.t.ppf(1 - alpha, dof) * se) if se > 0 else 0.0
    return {
        "t_lower": float(t_lo),
        "p_lower": p_lo,
        "t_upper": float(t_up),
        "p_upper": p_up,
        "p_value": max(p_lo, p_up),
        "ci_low": mean - half,
        "ci_high": mean + half,
    }


@dataclass(frozen=True)
class TostResult:
    """Paired TOST of cell ``a`` against cell ``b`` (d = a - b), bounds ``±delta``.

    ``equivalence_bound`` = ``max(|ci_low|, |ci_high|)`` of the ``1 - 2 alpha`` interval: the
    smallest symmetric margin that would have declared equivalence. The ``ratio_*`` fields are the
    same test on the log scale (ratio of geometric means of a over b within ``x(1 ± ratio_margin)``;
    ``ratio_bound`` = the smallest such r); NaN when ``ratio_margin`` is None or a value is <= 0.
    """

    a: Cell
    b: Cell
    value: str
    n: int
    n_prompts: int
    n_seeds: int
    unit: str
    design: str
    mean_a: float
    mean_b: float
    mean_diff: float
    se_diff: float
    dof: float
    margin: float
    relative: bool
    delta: float
    t_lower: float
    p_lower: float
    t_upper: float
    p_upper: float
    p_value: float
    ci_low: float
    ci_high: float
    ci_level: float
    alpha: float
    equivalent: bool
    equivalence_bound: float
    ratio_margin: float
    gm_ratio: float
    ratio_ci_low: float
    ratio_ci_high: float
    ratio_p_value: float
    ratio_equivalent: bool
    ratio_bound: float

    def as_row(self) -> dict[str, object]:
        return asdict(self)


def tost(
    df: pd.DataFrame,
    a: Cell = ("fap-synergy", 50),
    b: Cell = ("fap", 75),
    value: str = "kl",
    margin: float = 0.05,
    relative: bool = False,
    alpha: float = 0.05,
    seeds: Sequence[int] | None = None,
    ratio_margin: float | None = None,
) -> TostResult:
    """Paired two one-sided t-tests (Schuirmann's TOST) for ``|mean(a - b)| < delta``, on prompts.

    Rows are matched on (seed, prompt_idx); the per-unit differences ``u`` and their standard
    error and degrees of freedom come from :mod:`pie_lib.stats.design` / :func:`~pie_lib.stats.resample.mean_t`
    (shared prompts: ``se = sd(u)/sqrt(n_prompts)``, ``df = n_prompts - 1``; one seed: the classic
    paired TOST). Test: :func:`tost_bounds` with ``(-delta, delta)``.

    Args:
        df: results. a, b: ``(method, k)`` cells. value: compared column.
        margin: pre-specified absolute equivalence margin (> 0, in ``value`` units).
        relative: take ``delta = margin * |mean(b)|`` instead -- a margin estimated from the data
            (random, and for KL at K=50 wider than the baseline's own K=50 -> 75 gain); kept for
            old callers, not the default.
        alpha: level of each one-sided test. seeds: restrict to these seeds.
        ratio_margin: r in (0, 1) for the log-scale test of the geometric-mean ratio, bounds
            ``(log(1 - r), log(1 + r))`` on ``mean(log a - log b)``; None = skip.
    Returns:
        :class:`TostResult` (``ci_low, ci_high`` = the ``1 - 2 alpha`` CI of the mean difference).
    Raises:
        MissingResultError / UnpairedDataError as :func:`~pie_lib.stats.paired.paired_test`;
        ValueError for margin <= 0, ratio_margin outside (0, 1), alpha outside (0, 0.5) or fewer
        than 2 prompts.
    """
    if not margin > 0:
        raise ValueError(f"margin={margin} must be > 0")
    if ratio_margin is not None and not 0 < ratio_margin < 1:
        raise ValueError(f"ratio_margin={ratio_margin} must lie in (0, 1), e.g. 0.05 for x(1 ± 5%)")
    if not 0 < alpha < 0.5:
        raise ValueError(f"alpha={alpha} must lie in (0, 0.5)")
    pair, design = paired_units(df, a, b, value, seeds)
    xa, xb = pair["a"].to_numpy(), pair["b"].to_numpy()
    u = unit_matrix(xa - xb, design)
    g = design.unit_groups()
    if u.size < 2:
        raise ValueError(f"TOST needs at least 2 paired prompts, got {u.size}")
    mean_b = float(unit_matrix(xb, design).mean())
    delta = float(margin * abs(mean_b)) if relative else float(margin)
    t = mean_t(u, g)
    st = tost_bounds(t.mean, t.se, t.dof, -delta, delta, alpha)
    ratio: _RatioFields = {
        "gm_ratio": np.nan,
        "ratio_ci_low": np.nan,
        "ratio_ci_high": np.nan,
        "ratio_p_value": np.nan,
        "ratio_equivalent": False,
        "ratio_bound": np.nan,
    }
    la, _ = log_values(xa)
    lb, _ = log_values(xb)
    if la is not None and lb is not None:
        lu = unit_matrix(la - lb, design)
        lt = mean_t(lu, g)
        half = float(sps.t.ppf(1 - alpha, lt.dof) * lt.se) if lt.se > 0 else 0.0
        lo, hi = np.exp(lt.mean - half), np.exp(lt.mean + half)
        ratio["gm_ratio"] = float(np.exp(lt.mean))
        ratio["ratio_ci_low"] = float(lo)
        ratio["ratio_ci_high"] = float(hi)
        ratio["ratio_bound"] = float(max(1 - lo, hi - 1))
        if ratio_margin is not None:
            rs = tost_bounds(lt.mean, lt.se, lt.dof, np.log1p(-ratio_margin), np.log1p(ratio_margin), alpha)
            ratio["ratio_p_value"] = rs["p_value"]
            ratio["ratio_equivalent"] = bool(rs["p_value"] < alpha)
    return TostResult(
        a=(a[0], int(a[1])),
        b=(b[0], int(b[1])),
        value=value,
        n=design.n_prompts,
        n_prompts=design.n_prompts,
        n_seeds=design.n_seeds,
        unit=design.unit,
        design=design.case,
        mean_a=float(unit_matrix(xa, design).mean()),
        mean_b=mean_b,
        mean_diff=t.mean,
        se_diff=t.se,
        dof=t.dof,
        margin=float(margin),
        relative=relative,
        delta=delta,
        **st,
        ci_level=1 - 2 * alpha,
        alpha=alpha,
        equivalent=bool(st["p_value"] < alpha),
        equivalence_bound=float(max(abs(st["ci_low"]), abs(st["ci_high"]))),
        ratio_margin=float(ratio_margin) if ratio_margin is not None else np.nan,
        **ratio,
    )
