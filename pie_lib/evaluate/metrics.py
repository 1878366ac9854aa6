"""FADE's metrics (spec §8), in numpy, ties handled exactly.

- :func:`auroc` -- probability that a random positive scores above a random negative, ties
  counting one half (Mann-Whitney U with mid-ranks).
- :func:`gini` -- ``2 * AUROC - 1`` (signed; FADE reports ``|gini|``).
- :func:`average_precision` -- ``sum_n (R_n - R_{n-1}) P_n`` over the distinct score thresholds,
  from the highest down (tied scores enter together), as scikit-learn computes it.
- :func:`clarity`, :func:`responsiveness_purity`, :func:`faithfulness_score` -- the four numbers.
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np


def _ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank (like ``scipy.stats.rankdata``)."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    # boundaries of runs of equal values
    starts = np.r_[0, np.flatnonzero(xs[1:] != xs[:-1]) + 1]
    ends = np.r_[starts[1:], len(xs)]
    avg = (starts + ends + 1) / 2.0  # mean of ranks starts+1 .. ends
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for binary ``labels`` (1 = positive).

    Returns:
        AUROC in [0, 1]; NaN when either class is empty.
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).astype(bool).ravel()
    n1, n0 = int(y.sum()), int((~y).sum())
    if n1 == 0 or n0 == 0:
        return math.nan
    r = _ranks(s)
    return float((r[y].sum() - n1 * (n1 + 1) / 2.0) / (n1 * n0))


def gini(negatives: np.ndarray, positives: np.ndarray) -> float:
    """Signed Gini ``2 * AUROC - 1`` of activations separating ``positives`` from ``negatives``."""
    neg, pos = np.asarray(negatives, dtype=np.float64).ravel(), np.asarray(positives, dtype=np.float64).ravel()
    scores = np.r_[neg, pos]
    labels = np.r_[np.zeros(len(neg)), np.ones(len(pos))]
    return 2.0 * auroc(scores, labels) - 1.0


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """Average precision of ``scores`` for binary ``labels``; NaN when there is no positive."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).astype(bool).ravel()
    n_pos = int(y.sum())
    if n_pos == 0:
        return math.nan
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    tp = np.cumsum(y)
    # evaluate only at the last index of each run of tied scores (a threshold)
    last = np.r_[np.flatnonzero(s[1:] != s[:-1]), len(s) - 1]
    tp_t = tp[last].astype(np.float64)
    precision = tp_t / (last + 1)
    recall = tp_t / n_pos
    d_recall = np.diff(np.r_[0.0, recall])
    return float((d_recall * precision).sum())


def gini_and_ap(negatives: np.ndarray, positives: np.ndarray) -> tuple[float, float]:
    """FADE's pair: ``(|gini|, AP)``; when the Gini is negative the activations are flipped for
    the AP, so that AP is measured in the direction that separates the classes."""
    neg, pos = np.asarray(negatives, dtype=np.float64).ravel(), np.asarray(positives, dtype=np.float64).ravel()
    g = gini(neg, pos)
    scores = np.r_[neg, pos]
    labels = np.r_[np.zeros(len(neg)), np.ones(len(pos))]
    if g < 0:
        scores = -scores
    return abs(g), average_precision(scores, labels)


def clarity(natural_acts: np.ndarray, synthetic_acts: np.ndarray) -> float:
    """Clarity: ``|gini|`` separating activations on generated concept texts (label 1) from
    natural-corpus activations (label 0). NaN when either side is empty."""
    if len(natural_acts) == 0 or len(synthetic_acts) == 0:
        return math.nan
    return abs(gini(natural_acts, synthetic_acts))


def responsiveness_purity(acts: np.ndarray, ratings: np.ndarray) -> tuple[float, float]:
    """Responsiveness ``|gini|`` and purity (AP) of activations between samples rated 2 (label 1)
    and rated 0 (label 0); samples rated 1 (and unrated, < 0) are left out. NaN, NaN when either
    group is empty (FADE leaves them undefined then)."""
    a = np.asarray(acts, dtype=np.float64).ravel()
    r = np.asarray(ratings).ravel()
    pos, neg = a[r == 2], a[r == 0]
    if len(pos) == 0 or len(neg) == 0:
        return math.nan, math.nan
    return gini_and_ap(neg, pos)


def faithfulness_score(p2_by_factor: Mapping[float, float]) -> float:
    """Faithfulness ``max(max_f p2(f) - p2(0), 0) / (1 - p2(0))`` from the share of continuations
    rated 2 at each steering factor (factor 0 = unsteered). When ``p2(0) = 1`` nothing can be
    gained and the score is 0. NaN without a factor-0 entry."""
    if 0 not in p2_by_factor and 0.0 not in p2_by_factor:
        return math.nan
    base = float(p2_by_factor[0])
    best = max(float(v) for v in p2_by_factor.values())
    if base >= 1.0:
        return 0.0
    return max(best - base, 0.0) / (1.0 - base)
