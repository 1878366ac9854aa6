"""FADE's sparse-concept retry and the reasons of undefined scores (issue 11, item 7)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from pie_lib.evaluate.protocol import ProtocolConfig, _FeatureState, _responsiveness_status, _sparse_retry
from pie_lib.interpret.examples import NaturalActs


class _Store:
    def __init__(self, n: int) -> None:
        self.contexts = pd.DataFrame({"text": [f"context {i}" for i in range(n)]})


class _Rated:
    def __init__(self, ratings: np.ndarray) -> None:
        from pie_lib.llm import Usage

        self.ratings, self.usage, self.parse_failures = ratings, Usage(), 0


class _Rater:
    """Rates every text 2 and records what it was asked."""

    def __init__(self) -> None:
        self.asked: list[list[str]] = []

    def rate(self, description: str, texts: list[str]) -> _Rated:
        self.asked.append(texts)
        return _Rated(np.full(len(texts), 2, dtype=np.int64))


def _state(ratings: np.ndarray, idx: np.ndarray, acts: np.ndarray | None = None) -> _FeatureState:
    nat = None if acts is None else acts[idx]
    return _FeatureState(0, 1, "a concept", 1.0, natural_idx=idx, natural_acts=nat, ratings=ratings)


def test_too_few_concept_samples_rate_another_stratified_round_of_unrated_contexts():
    acts = np.random.default_rng(0).gamma(1.0, 1.0, 2000)
    pc = ProtocolConfig.named("fade")
    assert (pc.sparse_threshold, pc.max_sparse_retries) == (15, 1) and ProtocolConfig.named(
        "pie"
    ).max_sparse_retries == 0
    idx = np.arange(0, 500)
    s = _state(np.r_[np.full(10, 2), np.zeros(490, dtype=np.int64)], idx, acts)
    rater = _Rater()
    _sparse_retry(s, _Store(len(acts)), NaturalActs.dense(acts), pc, rater, np.random.default_rng(1))
    assert len(rater.asked) == 1 and s.n_sparse_resampled == len(rater.asked[0]) == 500
    assert np.unique(s.natural_idx).size == s.natural_idx.size == 1000  # new contexts only
    assert not np.isin(s.natural_idx[500:], idx).any() and s.ratings.size == 1000
    assert np.array_equal(s.natural_acts, acts[s.natural_idx])  # the rated contexts' own activations
    # enough concept samples: no retry
    enough = _state(np.r_[np.full(15, 2), np.zeros(485, dtype=np.int64)], idx, acts)
    rater2 = _Rater()
    _sparse_retry(enough, _Store(len(acts)), NaturalActs.dense(acts), pc, rater2, np.random.default_rng(1))
    assert rater2.asked == [] and enough.n_sparse_resampled == 0


def test_undefined_responsiveness_says_why():
    s = _state(np.zeros(20, dtype=np.int64), np.arange(20))
    assert _responsiveness_status(s, s.ratings) == "undefined: no sample rated 2"
    assert _responsiveness_status(s, np.full(20, 2)) == "undefined: no sample rated 0"
    assert _responsiveness_status(s, np.r_[0, 2]) == "computed"
