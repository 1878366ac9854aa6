"""Which natural samples get rated (spec §8).

- ``fade``: ~``n_samples`` (500): the share ``top_fraction`` (10%) from the very top activations,
  the rest split equally over the activation-percentile bins 0-50, 50-75, 75-95, 95-100 (every
  context in a bin equally likely; a bin smaller than its share is taken whole), as FADE does.
  Percentiles are over all corpus contexts, silent ones included (their activation is 0).
- ``pie``: the ``n_top`` (10) most active contexts plus ``n_random`` (10) drawn uniformly from
  the others, as the PIE reference does.
"""

from __future__ import annotations

import numpy as np

FADE_PERCENTILES: tuple[int, ...] = (0, 50, 75, 95, 100)


def fade_sample(
    acts: np.ndarray,
    n_samples: int = 500,
    top_fraction: float = 0.1,
    percentiles: tuple[int, ...] = FADE_PERCENTILES,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Indices of the natural samples to rate under FADE's sampling.

    Args:
        acts: ``[N]`` activation of every context (value at its token of largest |activation|).
    Returns:
        Sorted unique indices into ``acts`` (all of them when ``N <= n_samples``).
    """
    rng = rng or np.random.default_rng(0)
    n = len(acts)
    if n <= n_samples:
        return np.arange(n)
    order = np.argsort(acts, kind="mergesort")
    n_bins = len(percentiles) - 1
    per_bin = int(n_samples * (1 - top_fraction) // n_bins)
    chosen = []
    for lo, hi in zip(percentiles[:-1], percentiles[1:]):
        members = order[int(lo / 100 * n) : int(hi / 100 * n)]
        chosen.append(members if len(members) <= per_bin else rng.choice(members, per_bin, replace=False))
    picked = np.unique(np.concatenate(chosen))
    # fill up to n_samples from the top of the ranking (skipping what is already chosen)
    need = n_samples - len(picked)
    top = order[::-1][~np.isin(order[::-1], picked)][: max(need, 0)]
    return np.unique(np.concatenate([picked, top]))


def pie_sample(
    acts: np.ndarray, n_top: int = 10, n_random: int = 10, rng: np.random.Generator | None = None
) -> np.ndarray:
    """Indices of the ``n_top`` most active contexts (by |activation|) plus ``n_random`` others."""
    rng = rng or np.random.default_rng(0)
    order = np.argsort(-np.abs(acts), kind="mergesort")
    top = order[:n_top]
    rest = order[n_top:]
    rand = rng.choice(rest, min(n_random, len(rest)), replace=False) if len(rest) else rest
    return np.unique(np.concatenate([top, rand]))
