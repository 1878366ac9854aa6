"""FADE metrics and sampling against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pie_lib.evaluate.metrics import (
    auroc,
    average_precision,
    clarity,
    faithfulness_score,
    gini,
    gini_and_ap,
    responsiveness_purity,
)
from pie_lib.evaluate.sampling import fade_sample, pie_sample


def test_auroc_no_ties():
    # positives 0.35, 0.8 vs negatives 0.1, 0.4: pairs won 1 + 0 + 1 + 1 = 3 of 4
    assert auroc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == pytest.approx(0.75)


def test_auroc_with_ties_counts_half():
    # neg [0, 0, 1], pos [1, 2]: pos 1 beats 0, 0 and ties 1 (0.5); pos 2 beats all 3 -> 5.5 / 6
    assert auroc(np.array([0, 0, 1, 1, 2]), np.array([0, 0, 0, 1, 1])) == pytest.approx(5.5 / 6)
    assert auroc(np.ones(4), np.array([0, 1, 0, 1])) == pytest.approx(0.5)


def test_gini_is_two_auroc_minus_one():
    neg, pos = np.array([0.0, 0.0, 1.0]), np.array([1.0, 2.0])
    assert gini(neg, pos) == pytest.approx(2 * (5.5 / 6) - 1)
    assert gini(pos, neg) == pytest.approx(-(2 * (5.5 / 6) - 1))  # swapped classes: sign flips
    rng = np.random.default_rng(0)
    s, y = rng.integers(0, 4, 50).astype(float), rng.integers(0, 2, 50)  # many ties
    assert gini(s[y == 0], s[y == 1]) == pytest.approx(2 * auroc(s, y) - 1)


def test_auroc_brute_force_with_ties():
    rng = np.random.default_rng(1)
    s, y = rng.integers(0, 5, 40).astype(float), rng.integers(0, 2, 40)
    pos, neg = s[y == 1], s[y == 0]
    brute = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
    assert auroc(s, y) == pytest.approx(brute)


def test_average_precision_hand_values():
    # ranking 0.8(+) 0.4(-) 0.35(+) 0.1(-): P@1 = 1, P@3 = 2/3 -> (1 + 2/3) / 2
    assert average_precision(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == pytest.approx(5 / 6)
    # tie at 0.5 enters together: (R=1/2, P=1/2), then (R=1, P=2/3) -> 0.25 + 1/3
    assert average_precision(np.array([0.5, 0.5, 0.2]), np.array([1, 0, 1])) == pytest.approx(0.25 + 1 / 3)
    assert math.isnan(average_precision(np.array([1.0, 2.0]), np.array([0, 0])))


def test_gini_and_ap_flips_direction_for_ap():
    neg, pos = np.array([3.0, 4.0]), np.array([1.0, 2.0])  # perfectly separated, but inverted
    g, ap = gini_and_ap(neg, pos)
    assert g == pytest.approx(1.0) and ap == pytest.approx(1.0)


def test_clarity_responsiveness_purity():
    assert clarity(np.zeros(10), np.ones(3)) == pytest.approx(1.0)
    assert math.isnan(clarity(np.zeros(10), np.zeros(0)))
    acts = np.array([0.0, 0.1, 0.9, 0.8, 0.5, 0.7])
    ratings = np.array([0, 0, 2, 2, 1, -1])  # rated 1 and unrated are left out
    r, p = responsiveness_purity(acts, ratings)
    assert r == pytest.approx(1.0) and p == pytest.approx(1.0)
    r, p = responsiveness_purity(acts, np.array([0, 0, 0, 1, 1, 1]))  # no rated-2 sample
    assert math.isnan(r) and math.isnan(p)


def test_faithfulness_score():
    assert faithfulness_score({0: 0.2, 1: 0.6, 10: 0.4}) == pytest.approx((0.6 - 0.2) / 0.8)
    assert faithfulness_score({0: 0.5, 1: 0.1}) == 0.0
    assert faithfulness_score({0: 1.0, 1: 1.0}) == 0.0
    assert math.isnan(faithfulness_score({1: 0.5}))


def test_fade_sample_bins_and_top():
    acts = np.r_[np.zeros(700), np.linspace(0.1, 1.0, 300)]
    idx = fade_sample(acts, n_samples=100, top_fraction=0.1, rng=np.random.default_rng(0))
    assert len(idx) == 100 and len(np.unique(idx)) == 100
    order = np.argsort(acts, kind="mergesort")
    rank = np.empty(len(acts), int)
    rank[order] = np.arange(len(acts))
    pct = rank[idx] / len(acts) * 100
    for lo, hi in ((0, 50), (50, 75), (75, 95), (95, 100)):
        assert ((pct >= lo) & (pct < hi)).sum() >= 22  # 22 per bin (+ top fill in the last)
    assert set(np.argsort(acts)[-5:]).issubset(set(idx))  # the very top is in
    assert len(fade_sample(acts[:50], n_samples=100)) == 50


def test_pie_sample():
    acts = np.arange(100, dtype=float)
    idx = pie_sample(acts, n_top=10, n_random=10, rng=np.random.default_rng(0))
    assert len(idx) == 20 and set(range(90, 100)).issubset(set(idx))
