"""Which natural samples get rated (spec §8).

- ``fade``: ~``n_samples`` (500): the share ``top_fraction`` (10%) from the very top activations,
  the rest split equally over the activation-percentile bins 0-50, 50-75, 75-95, 95-100 (every
  context in a bin equally likely; a bin smaller than its share is taken whole), as FADE does.
  Percentiles are over all corpus contexts, silent ones included (their activation is 0).
- ``pie``: the ``n_top`` (10) most active contexts plus ``n_random`` (10) drawn uniformly from
  the others, as the PIE reference does.

On a streaming example store that does not hold every context, the population is given by held
contexts with weights (:class:`pie_lib.interpret.examples.NaturalActs`): :func:`fade_sample_weighted`
places each held context at the percentile of the middle of the block of contexts it stands for
(exact for the top list and for the silent / active split, estimated from the reservoir for active
contexts below the top list) and draws within a bin with probability proportional to the weights;
:func:`pie_sample_held` takes the exact top list and draws the random ones from the uniform
context sample. With all weights 1 both are exactly :func:`fade_sample` / :func:`pie_sample`.
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


def fade_sample_weighted(
    acts: np.ndarray,
    weight: np.ndarray,
    n_samples: int = 500,
    top_fraction: float = 0.1,
    percentiles: tuple[int, ...] = FADE_PERCENTILES,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """:func:`fade_sample` over a population given by held contexts that stand for ``weight``
    contexts each (module docstring); exactly :func:`fade_sample` when every weight is 1.

    A bin whose population is at most its share is taken whole (its held contexts); a bin holding
    fewer contexts than its share gives all of them (the sample comes out smaller, as
    ``n_natural`` shows). The fill from the top uses the held contexts in activation order.

    Args:
        acts: ``[P]`` activations of the held contexts; weight: ``[P]`` contexts each stands for.
    Returns:
        Sorted unique indices into ``acts``.
    """
    w = np.asarray(weight, dtype=np.float64)
    if len(w) == 0 or bool((w == 1).all()):
        return fade_sample(acts, n_samples, top_fraction, percentiles, rng)
    rng = rng or np.random.default_rng(0)
    total = float(w.sum())
    if total <= n_samples:
        return np.arange(len(acts))
    order = np.argsort(acts, kind="mergesort")
    ws = w[order]
    mid = (np.cumsum(ws) - ws / 2) / total * 100  # percentile of the middle of each held block
    n_bins = len(percentiles) - 1
    per_bin = int(n_samples * (1 - top_fraction) // n_bins)
    chosen = []
    for i, (lo, hi) in enumerate(zip(percentiles[:-1], percentiles[1:])):
        inside = (mid >= lo) & ((mid < hi) if i < n_bins - 1 else (mid <= hi))
        members = order[inside]
        mass = float(w[members].sum())
        if mass <= per_bin or len(members) <= per_bin:
            chosen.append(members)
        else:
            chosen.append(rng.choice(members, per_bin, replace=False, p=w[members] / mass))
    picked = np.unique(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)
    need = n_samples - len(picked)
    top = order[::-1][~np.isin(order[::-1], picked)][: max(need, 0)]
    return np.unique(np.concatenate([picked, top]))


def pie_sample_held(
    acts: np.ndarray,
    keys: np.ndarray,
    n_top_exact: int,
    uniform_keys: np.ndarray,
    n_top: int = 10,
    n_random: int = 10,
    rng: np.random.Generator | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`pie_sample` on a streaming store's held contexts: the ``n_top`` strongest of the exact
    top list (``acts[:n_top_exact]``, active contexts only), plus ``n_random`` drawn uniformly from
    the uniform context sample's contexts outside them, i.e. a uniform draw from all the others.

    Args:
        acts, keys: ``[P]`` held activations and their context keys (positions); the first
            ``n_top_exact`` are the exact top list.
        uniform_keys: ``[M]`` context keys of the uniform context sample.
    Returns:
        (sorted indices into ``acts`` of the top ones, sorted indices into ``uniform_keys`` of the
        random ones).
    """
    rng = rng or np.random.default_rng(0)
    head = np.asarray(acts[:n_top_exact], dtype=np.float64)
    top = np.argsort(-np.abs(head), kind="mergesort")[:n_top]
    top = top[head[top] != 0]
    rest = np.flatnonzero(~np.isin(uniform_keys, np.asarray(keys)[top]))
    rand = rng.choice(rest, min(n_random, len(rest)), replace=False) if len(rest) else rest
    return np.sort(top), np.sort(rand)
