"""Resampling and t-inference on the right unit (see :mod:`pie_lib.stats.design`).

Everything works on a per-unit matrix ``U`` ``[n, m]`` (one row per unit, one column per quantity:
a cell's value, a difference, every K of a curve) with a stratum per unit ``g`` ``[n]``:

- one stratum (single seed, or shared prompts averaged over their seeds): the ordinary bootstrap
  over units. Resample b draws ``idx[b] = rng.integers(0, n, n)`` from
  ``numpy.random.default_rng(seed)`` -- the draws ``scipy.stats.bootstrap`` makes with the same
  generator, so the BCa interval here equals scipy's on identical data.
- several strata (seed-specific prompts): a two-stage bootstrap -- draw S seeds with
  replacement, then, inside each drawn seed, its prompts with replacement -- on values whose
  seed effects are shrunk so that the bootstrap variance of the mean equals the one-way
  random-effects estimate (Davison & Hinkley 1997, §3.8): ``u* = G + c (M_s - G) + r_s (u - M_s)``
  with ``G`` the grand mean, ``M_s`` the seed means, ``r_s = sqrt(n_s / (n_s - 1))`` and
  ``c^2 = S/(S-1) * sigma_b^2 / var(M_s)``. The plain two-stage bootstrap counts the
  within-seed noise twice (about 1.7x the variance with 3 seeds); the plain seed bootstrap with
  3 seeds has 10 distinct resamples.

:func:`mean_t` is the matching t-inference: the one-sample t over units (one stratum) or the
random-effects standard error ``SE^2 = sigma_b^2 sum_s w_s^2 + MSW / N`` with Satterthwaite
degrees of freedom (several strata). With few seeds the between-seed variance rests on ``S - 1``
degrees of freedom: intervals are then wide, as they should be.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypedDict

import numpy as np
from scipy.special import ndtr, ndtri

from pie_lib.stats.draws import bootstrap_indices, bootstrap_weights


class OneWayComponents(TypedDict):
    """:func:`one_way_components`: per-quantity arrays are ``[m]`` (numpy scalars for a 1-D ``u``)."""

    grand: np.ndarray
    msb: np.ndarray
    msw: np.ndarray
    n0: float
    var_between: np.ndarray
    var_within: np.ndarray
    sum_w2: float
    df_b: int
    df_w: float
    means: np.ndarray
    n_s: np.ndarray


def one_way_components(u: np.ndarray, g: np.ndarray) -> OneWayComponents:
    """One-way random-effects ANOVA of ``u`` ``[n]`` or ``[n, m]`` with groups ``g`` ``[n]`` (0..S-1).

    Returns:
        dict of arrays (``[m]`` or scalars): ``grand`` (mean over units), ``msb``, ``msw``,
        ``n0 = (N - sum n_s^2 / N) / (S - 1)``, ``var_between = max(0, (MSB - MSW) / n0)``,
        ``var_within = MSW``, ``sum_w2 = sum_s (n_s / N)^2``, ``df_b = S - 1``, ``df_w = N - S``.
    """
    u = np.asarray(u, dtype=np.float64)
    g = np.asarray(g, dtype=np.int64)
    s_count = int(g.max()) + 1
    n_s = np.bincount(g, minlength=s_count).astype(np.float64)
    big_n = float(u.shape[0])
    sums = np.zeros((s_count, *u.shape[1:]))
    np.add.at(sums, g, u)
    means = sums / n_s.reshape(-1, *([1] * (u.ndim - 1)))
    grand = u.mean(axis=0)
    df_b, df_w = s_count - 1, big_n - s_count
    w = n_s.reshape(-1, *([1] * (u.ndim - 1)))
    msb = (w * (means - grand) ** 2).sum(axis=0) / max(df_b, 1)
    msw = ((u - means[g]) ** 2).sum(axis=0) / df_w if df_w > 0 else np.full_like(grand, np.nan)
    n0 = (big_n - (n_s**2).sum() / big_n) / max(df_b, 1)
    with np.errstate(invalid="ignore"):
        var_b = np.maximum(0.0, (msb - np.nan_to_num(msw)) / n0)
    return {
        "grand": grand,
        "msb": msb,
        "msw": msw,
        "n0": n0,
        "var_between": var_b,
        "var_within": msw,
        "sum_w2": float(((n_s / big_n) ** 2).sum()),
        "df_b": df_b,
        "df_w": df_w,
        "means": means,
        "n_s": n_s,
    }


@dataclass(frozen=True)
class TInference:
    """Mean of per-unit values with its standard error and degrees of freedom."""

    mean: float
    se: float
    dof: float
    sd_units: float


def mean_t(u: np.ndarray, g: np.ndarray) -> TInference:
    """Standard error and degrees of freedom of the mean of ``u`` ``[n]`` (formulas: module doc)."""
    u = np.asarray(u, dtype=np.float64)
    n = u.size
    sd = float(u.std(ddof=1)) if n > 1 else np.nan
    if int(np.max(g)) == 0:
        return TInference(float(u.mean()), sd / np.sqrt(n) if n > 1 else np.nan, float(n - 1), sd)
    c = one_way_components(u, g)
    msb, msw, vb = float(c["msb"]), float(c["msw"]), float(c["var_between"])
    if not np.isfinite(msw):
        return TInference(float(u.mean()), np.nan, np.nan, sd)
    if vb == 0.0:
        return TInference(float(u.mean()), float(np.sqrt(msw / n)), float(c["df_w"]), sd)
    a = c["sum_w2"] / c["n0"]
    b = 1.0 / n - a
    var = a * msb + b * msw
    denom = (a * msb) ** 2 / c["df_b"] + (b * msw) ** 2 / c["df_w"]
    return TInference(float(u.mean()), float(np.sqrt(var)), float(var**2 / denom) if denom > 0 else np.nan, sd)


def unit_weights(g: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """``W`` ``[n_boot, n]``: how often each unit is drawn in each resample (module doc).

    One stratum: ``bootstrap_weights(bootstrap_indices(n, n_boot, seed))``. Several: seeds with
    replacement, then prompts with replacement inside each drawn seed.
    """
    g = np.asarray(g, dtype=np.int64)
    n = g.size
    s_count = int(g.max()) + 1 if n else 0
    if s_count <= 1:
        return bootstrap_weights(bootstrap_indices(n, n_boot, seed), n)
    rng = np.random.default_rng(seed)
    members = [np.flatnonzero(g == s) for s in range(s_count)]
    top = rng.integers(0, s_count, size=(n_boot, s_count))  # [n_boot, S] drawn seeds
    w = np.zeros((n_boot, n))
    for pos in range(s_count):
        for s, mem in enumerate(members):
            rows = np.flatnonzero(top[:, pos] == s)
            if rows.size == 0:
                continue
            pick = mem[rng.integers(0, mem.size, size=(rows.size, mem.size))]  # [rows, n_s]
            flat = (pick + n * np.arange(rows.size)[:, None]).ravel()
            w[rows] += np.bincount(flat, minlength=rows.size * n).reshape(rows.size, n)
    return w


def shrunk_values(u: np.ndarray, g: np.ndarray) -> np.ndarray:
    """``u*`` of the module doc: values whose two-stage bootstrap has the random-effects variance."""
    u = np.asarray(u, dtype=np.float64)
    if int(np.max(g)) == 0:
        return u
    c = one_way_components(u, g)
    s_count = c["means"].shape[0]
    var_m = np.var(c["means"], axis=0, ddof=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        shrink = np.sqrt(np.where(var_m > 0, s_count / (s_count - 1) * c["var_between"] / var_m, 0.0))
    n_s = c["n_s"][g].reshape(-1, *([1] * (u.ndim - 1)))
    r = np.sqrt(np.where(n_s > 1, n_s / np.maximum(n_s - 1, 1), 1.0))
    m = c["means"][g]
    return c["grand"] + shrink * (m - c["grand"]) + r * (u - m)


def boot_means(u: np.ndarray, g: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """Resampled means ``[n_boot, ...]`` of per-unit values ``u`` ``[n, ...]`` (unit-aware)."""
    u = np.asarray(u, dtype=np.float64)
    w = unit_weights(g, n_boot, seed)
    flat = shrunk_values(u, g).reshape(u.shape[0], -1)
    out = (w @ flat) / w.sum(axis=1, keepdims=True)
    return out.reshape((n_boot, *u.shape[1:]))


def jackknife_means(u: np.ndarray) -> np.ndarray:
    """Leave-one-unit-out means ``[n, ...]`` of ``u`` ``[n, ...]``."""
    u = np.asarray(u, dtype=np.float64)
    n = u.shape[0]
    return (u.sum(axis=0) - u) / (n - 1)


def bca_interval(
    theta_hat: np.ndarray, boot: np.ndarray, jack: np.ndarray, level: float = 0.95
) -> tuple[np.ndarray, np.ndarray]:
    """Bias-corrected and accelerated bootstrap interval (Efron & Tibshirani 1993, §14.3).

    Args:
        theta_hat: ``[...]`` estimate. boot: ``[n_boot, ...]`` resampled estimates.
        jack: ``[n, ...]`` leave-one-out estimates. level: two-sided coverage.
    Returns:
        ``(low, high)``: the ``alpha_1``, ``alpha_2`` quantiles of ``boot`` with
        ``z0 = Phi^-1(#{boot < theta} + #{boot <= theta}) / (2 B))``,
        ``a = sum U^3 / (6 (sum U^2)^1.5)``, ``U_i = (n-1)(mean(jack) - jack_i)``,
        ``alpha_k = Phi(z0 + (z0 + z_k) / (1 - a (z0 + z_k)))``. A degenerate bootstrap (every
        resample equal) gives ``[theta, theta]``; ``z0`` is clipped to the resolution of B
        resamples when theta lies outside them all.
    """
    if not 0 < level < 1:
        raise ValueError(f"level={level} must lie in (0, 1)")
    boot = np.asarray(boot, dtype=np.float64)
    theta = np.asarray(theta_hat, dtype=np.float64)
    b = boot.shape[0]
    frac = ((boot < theta).sum(axis=0) + (boot <= theta).sum(axis=0)) / (2.0 * b)
    z0 = ndtri(np.clip(frac, 0.5 / b, 1 - 0.5 / b))
    jack = np.asarray(jack, dtype=np.float64)
    n = jack.shape[0]
    uu = (n - 1) * (jack.mean(axis=0) - jack)
    num, den = (uu**3).sum(axis=0) / n**3, (uu**2).sum(axis=0) / n**2
    with np.errstate(divide="ignore", invalid="ignore"):
        a = np.where(den > 0, num / (6.0 * den**1.5), 0.0)
    z = ndtri((1 - level) / 2)
    a1 = ndtr(z0 + (z0 + z) / (1 - a * (z0 + z)))
    a2 = ndtr(z0 + (z0 - z) / (1 - a * (z0 - z)))
    flat_b = boot.reshape(b, -1)
    a1f, a2f = np.broadcast_to(a1, theta.shape).ravel(), np.broadcast_to(a2, theta.shape).ravel()
    lo = np.array([np.quantile(flat_b[:, j], a1f[j]) for j in range(flat_b.shape[1])])
    hi = np.array([np.quantile(flat_b[:, j], a2f[j]) for j in range(flat_b.shape[1])])
    same = np.ptp(flat_b, axis=0) == 0
    lo, hi = np.where(same, theta.ravel(), lo), np.where(same, theta.ravel(), hi)
    return lo.reshape(theta.shape), hi.reshape(theta.shape)


def mean_ci(u: np.ndarray, g: np.ndarray, n_boot: int, seed: int, level: float) -> tuple[np.ndarray, np.ndarray]:
    """BCa interval of the mean of per-unit values ``u`` ``[n, ...]`` (unit-aware resampling)."""
    u = np.asarray(u, dtype=np.float64)
    if u.shape[0] < 2:
        nan = np.full(u.shape[1:], np.nan)
        return nan, nan
    return bca_interval(u.mean(axis=0), boot_means(u, g, n_boot, seed), jackknife_means(u), level)


def weighted_medians(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Medians of the resamples ``[n_boot]``: values ``x`` ``[n]`` repeated ``w[b]`` times.

    For integer weights this equals ``np.median`` of the expanded sample (mean of the two middle
    order statistics when the total count is even).
    """
    order = np.argsort(x, kind="stable")
    xs = x[order]
    cw = np.cumsum(w[:, order], axis=1)  # [n_boot, n]
    total = cw[:, -1]
    k1 = np.floor((total - 1) / 2)
    k2 = np.floor(total / 2)
    i1 = (cw <= k1[:, None]).sum(axis=1)
    i2 = (cw <= k2[:, None]).sum(axis=1)
    return 0.5 * (xs[np.minimum(i1, xs.size - 1)] + xs[np.minimum(i2, xs.size - 1)])


def median_ci(u: np.ndarray, g: np.ndarray, n_boot: int, seed: int, level: float) -> tuple[float, float, float]:
    """Median of per-unit values ``u`` ``[n]`` and its percentile bootstrap interval (unit-aware)."""
    u = np.asarray(u, dtype=np.float64)
    med = float(np.median(u))
    if u.size < 2:
        return med, np.nan, np.nan
    meds = weighted_medians(shrunk_values(u, g), unit_weights(g, n_boot, seed))
    lo, hi = np.quantile(meds, [(1 - level) / 2, (1 + level) / 2])
    return med, float(lo), float(hi)


def log_values(x: np.ndarray) -> tuple[np.ndarray | None, int]:
    """``log x`` for a strictly positive ``x``; ``(None, #non-positive)`` when some value is <= 0."""
    x = np.asarray(x, dtype=np.float64)
    bad = int((x <= 0).sum())
    return (None, bad) if bad else (np.log(x), 0)
