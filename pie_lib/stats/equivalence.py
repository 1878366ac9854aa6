"""TOST: two one-sided paired t-tests for equivalence of two (method, K) cells.

Behind the paper's Effective-Budget claim "FAP-Synergy at K=50 matches the baselines at K=75"
(spec §3, §9): absence of a significant difference is not evidence of equivalence; TOST tests
``H0: |mu_d| >= delta`` against ``H1: |mu_d| < delta`` directly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
from scipy import stats as sps

from pie_lib.stats._frame import Cell, paired_cells


@dataclass(frozen=True)
class TostResult:
    """Paired TOST of cell ``a`` against cell ``b`` (d = a - b), equivalence bounds ``±delta``."""

    a: Cell
    b: Cell
    value: str
    n: int
    mean_a: float
    mean_b: float
    mean_diff: float
    se_diff: float
    dof: int
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
) -> TostResult:
    """Paired two one-sided t-tests (Schuirmann's TOST) for ``|mean(a - b)| < delta``.

    With d_i = x_a(i) - x_b(i) over the n matched prompts (seed, prompt_idx),
    ``dbar = mean(d)``, ``se = sd(d, ddof=1) / sqrt(n)``, df = n - 1, T = Student t CDF:

    - ``delta = margin`` (absolute, in ``value`` units) or ``margin * |mean(x_b)|`` (relative).
    - lower test, H0: mu_d <= -delta: ``t_lower = (dbar + delta) / se``, ``p_lower = 1 - T(t_lower)``.
    - upper test, H0: mu_d >= +delta: ``t_upper = (dbar - delta) / se``, ``p_upper = T(t_upper)``.
    - ``p_value = max(p_lower, p_upper)``; ``equivalent = p_value < alpha``, which is the same
      as the ``1 - 2 alpha`` CI ``dbar ± t_{1-alpha, df} se`` lying inside ``(-delta, delta)``.

    Args:
        df: results. a, b: ``(method, k)`` cells. value: compared column.
        margin: equivalence margin (> 0). relative: margin as a fraction of b's mean.
        alpha: level of each one-sided test. seeds: restrict to these seeds.
    Returns:
        :class:`TostResult` (``ci_low, ci_high`` = the ``1 - 2 alpha`` CI of the mean difference).
    Raises:
        MissingResultError / UnpairedDataError as :func:`~pie_lib.stats.paired.paired_test`;
        ValueError for margin <= 0, alpha outside (0, 0.5) or fewer than 2 pairs.
    """
    if not margin > 0:
        raise ValueError(f"margin={margin} must be > 0")
    if not 0 < alpha < 0.5:
        raise ValueError(f"alpha={alpha} must lie in (0, 0.5)")
    pair = paired_cells(df, a, b, value, seeds)
    d = (pair["a"] - pair["b"]).to_numpy()
    n = d.size
    if n < 2:
        raise ValueError(f"TOST needs at least 2 paired prompts, got {n}")
    mean_b = float(pair["b"].mean())
    delta = float(margin * abs(mean_b)) if relative else float(margin)
    dbar = float(d.mean())
    se = float(d.std(ddof=1) / np.sqrt(n))
    dof = n - 1
    with np.errstate(divide="ignore", invalid="ignore"):
        t_lo = (dbar + delta) / se if se > 0 else np.copysign(np.inf, dbar + delta)
        t_up = (dbar - delta) / se if se > 0 else np.copysign(np.inf, dbar - delta)
    p_lo = float(sps.t.sf(t_lo, dof))
    p_up = float(sps.t.cdf(t_up, dof))
    p = max(p_lo, p_up)
    half = float(sps.t.ppf(1 - alpha, dof) * se)
    return TostResult(
        a=(a[0], int(a[1])), b=(b[0], int(b[1])), value=value, n=n,
        mean_a=float(pair["a"].mean()), mean_b=mean_b, mean_diff=dbar, se_diff=se, dof=dof,
        margin=float(margin), relative=relative, delta=delta,
        t_lower=float(t_lo), p_lower=p_lo, t_upper=float(t_up), p_upper=p_up, p_value=p,
        ci_low=dbar - half, ci_high=dbar + half, ci_level=1 - 2 * alpha, alpha=alpha,
        equivalent=bool(p < alpha),
    )
