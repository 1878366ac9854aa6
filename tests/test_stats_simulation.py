"""pie_lib.stats against simulated results tables with a known truth (issue 11, item 8).

Each test draws many synthetic tables -- prompts shared by several seeds, or each seed with its
own prompts -- from a model whose true difference is known, runs the public functions on every
table and checks an error rate or an interval width. The tables are drawn vectorised from one
seeded generator, so every number here is reproducible; the Monte-Carlo bounds are wide enough
(about ±2.7 binomial standard deviations around 0.05 for 300+ tables) that a correct method
passes for any seed and the old row-pooling statistics fail.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from pie_lib.errors import DataFormatError
from pie_lib.stats import detect_design, matched_seed_ablation, paired_test, summarize, tost

P, S = 40, 3  # prompts, seeds (the setting)


def make_table(a: np.ndarray, b: np.ndarray, shared: bool, id_column: bool = True) -> pd.DataFrame:
    """Cells ("A", 50) and ("B", 75) from values ``a``, ``b`` ``[S, P]`` (rows = seeds).

    ``shared``: every seed holds the same P prompts (same prompt_idx, same prompt id); otherwise
    seed s holds its own prompts (same prompt_idx 0..P-1, different prompt id).
    """
    s_count, p_count = a.shape
    seed = np.repeat(np.arange(s_count), p_count)
    pidx = np.tile(np.arange(p_count), s_count)
    cols = {"seed": np.r_[seed, seed], "prompt_idx": np.r_[pidx, pidx]}
    if id_column:
        pid = np.array([f"p{i}" if shared else f"s{s}p{i}" for s, i in zip(seed, pidx)])
        cols["prompt_id"] = np.r_[pid, pid]
    return pd.DataFrame(
        {
            "method": ["A"] * seed.size + ["B"] * seed.size,
            "k": [50] * seed.size + [75] * seed.size,
            **cols,
            "kl": np.r_[a.ravel(), b.ravel()],
        }
    )


def shared_tables(rng: np.random.Generator, n_tables: int, true_diff: float = 0.0):
    """Shared prompts: b deterministic (exact copies over seeds), a = b + prompt effect + draw noise.

    Heavy-tailed base KL (lognormal), a per-prompt reranking effect w_i ~ N(0, 0.3) with mean 0
    (+ ``true_diff``), and per-(seed, prompt) partner-draw noise ~ N(0, 0.1).
    """
    u = rng.lognormal(0.0, 0.8, size=(n_tables, 1, P))
    w = rng.normal(0.0, 0.3, size=(n_tables, 1, P))
    e = rng.normal(0.0, 0.1, size=(n_tables, S, P))
    b = np.broadcast_to(u, (n_tables, S, P))
    return b + true_diff + w + e, b


def distinct_tables(rng: np.random.Generator, n_tables: int, true_diff: float = 0.0):
    """Seed-specific prompts: every (seed, prompt) its own draw of the shared-prompt model."""
    u = rng.lognormal(0.0, 0.8, size=(n_tables, S, P))
    w = rng.normal(0.0, 0.3, size=(n_tables, S, P))
    e = rng.normal(0.0, 0.1, size=(n_tables, S, P))
    return u + true_diff + w + e, u


# --- type-I error of paired_test --------------------------------------------------------------


def test_paired_test_type_one_error_with_shared_prompts():
    a, b = shared_tables(np.random.default_rng(11), 300)
    p = np.array(
        [paired_test(make_table(a[t], b[t], shared=True), ("A", 50), ("B", 75), n_boot=100).p_t for t in range(len(a))]
    )
    rate = float((p < 0.05).mean())
    assert 0.02 <= rate <= 0.08, rate
    # the same tables treated row by row (S x P "units", the old behaviour) reject far too often
    pooled = sps.ttest_rel(a.reshape(len(a), -1), b.reshape(len(b), -1), axis=1).pvalue
    assert (pooled < 0.05).mean() > 0.15
    r = paired_test(make_table(a[0], b[0], shared=True), ("A", 50), ("B", 75), n_boot=100)
    assert (r.n_prompts, r.n_seeds, r.n_rows, r.unit, r.design) == (P, S, S * P, "prompt", "shared prompts")


def test_paired_test_type_one_error_with_seed_specific_prompts():
    a, b = distinct_tables(np.random.default_rng(12), 300)
    res = [paired_test(make_table(a[t], b[t], shared=False), ("A", 50), ("B", 75), n_boot=100) for t in range(len(a))]
    rate = float(np.mean([r.p_t < 0.05 for r in res]))
    assert 0.02 <= rate <= 0.08, rate
    assert (res[0].n_prompts, res[0].n_seeds, res[0].unit) == (S * P, S, "prompt within seed")


def test_type_one_error_without_a_prompt_id_column_falls_back_to_prompt_idx():
    """No prompt id: same prompt_idx = same prompt (said so in ``basis``), still the right rate."""
    a, b = shared_tables(np.random.default_rng(13), 300)
    p = np.array(
        [
            paired_test(make_table(a[t], b[t], True, id_column=False), ("A", 50), ("B", 75), n_boot=50).p_t
            for t in range(len(a))
        ]
    )
    assert 0.02 <= (p < 0.05).mean() <= 0.08
    s = summarize(make_table(a[0], b[0], True, id_column=False), n_boot=50)
    assert s["basis"].str.startswith("prompt_idx").all() and (s["n_prompts"] == P).all()


# --- TOST size at the margin ------------------------------------------------------------------


@pytest.mark.parametrize("shared", [True, False])
def test_tost_size_at_the_margin(shared):
    margin = 0.1
    make = shared_tables if shared else distinct_tables
    a, b = make(np.random.default_rng(21 + shared), 300, true_diff=margin)  # the truth sits on the margin
    eq = np.array(
        [tost(make_table(a[t], b[t], shared), ("A", 50), ("B", 75), margin=margin).equivalent for t in range(len(a))]
    )
    assert eq.mean() <= 0.08, eq.mean()
    assert eq.mean() >= 0.01 if shared else True  # an exact test at its boundary is not vacuous
    # with no true difference and a margin of ~4 standard errors it declares equivalence (power)
    a0, b0 = make(np.random.default_rng(31), 40)
    assert (
        np.mean(
            [tost(make_table(a0[t], b0[t], shared), ("A", 50), ("B", 75), margin=0.25).equivalent for t in range(40)]
        )
        > 0.8
    )


def test_tost_ratio_margin_size_at_the_margin():
    r = 0.1
    rng = np.random.default_rng(43)
    n_t = 400
    b = np.broadcast_to(rng.lognormal(0, 0.8, (n_t, 1, P)), (n_t, S, P))
    log_ratio = np.log1p(r) + rng.normal(0, 0.2, (n_t, 1, P)) + rng.normal(0, 0.05, (n_t, S, P))
    a = b * np.exp(log_ratio)  # geometric-mean ratio exactly 1 + r in the population
    eq = np.array(
        [
            tost(make_table(a[t], b[t], True), ("A", 50), ("B", 75), margin=10.0, ratio_margin=r).ratio_equivalent
            for t in range(n_t)
        ]
    )
    assert eq.mean() <= 0.08


# --- interval width does not shrink by copying rows -------------------------------------------


def test_ci_width_of_a_deterministic_method_is_the_same_with_one_or_three_seeds():
    rng = np.random.default_rng(5)
    x = rng.lognormal(0, 1.0, P)
    one = make_table(x[None, :], x[None, :], shared=True)
    three = make_table(np.tile(x, (S, 1)), np.tile(x, (S, 1)), shared=True)
    w1 = summarize(one, n_boot=2000).set_index("method").loc["B"]
    w3 = summarize(three, n_boot=2000).set_index("method").loc["B"]
    for lo, hi in (("ci_low", "ci_high"), ("median_ci_low", "median_ci_high"), ("gmean_ci_low", "gmean_ci_high")):
        ratio = (w3[hi] - w3[lo]) / (w1[hi] - w1[lo])
        assert 0.85 <= ratio <= 1.15, (lo, ratio)
    assert (
        w3["n_prompts"] == w1["n_prompts"] == P and w3["n_seeds"] == S and w3["seed_sd"] == pytest.approx(0, abs=1e-12)
    )
    # and over many tables with draw noise: a seeded method's CI is no narrower than its prompts allow
    a, b = shared_tables(np.random.default_rng(6), 30)
    width = lambda df: (lambda r: r["ci_high"] - r["ci_low"])(summarize(df, n_boot=500).set_index("method").loc["A"])  # noqa: E731
    ratios = [width(make_table(a[t], b[t], True)) / width(make_table(a[t, :1], b[t, :1], True)) for t in range(30)]
    assert 0.85 <= np.median(ratios) <= 1.05  # draw noise (sd 0.1) is small beside the prompt spread


def test_summarize_mean_ci_covers_on_shared_prompts():
    """Coverage of the mean's BCa interval over 200 tables of heavy-tailed KL with shared prompts."""
    rng = np.random.default_rng(8)
    n_t = 200
    u = rng.lognormal(0, 0.6, (n_t, 1, P))
    x = u + rng.normal(0, 0.1, (n_t, S, P))
    truth = np.exp(0.6**2 / 2)
    cover = []
    for t in range(n_t):
        df = make_table(x[t], x[t], True)
        r = summarize(df[df["method"] == "A"], n_boot=1000).iloc[0]
        cover.append(r["ci_low"] <= truth <= r["ci_high"])
    assert 0.89 <= np.mean(cover) <= 0.99


# --- BCa and TOST against independent computations --------------------------------------------


def test_bca_equals_scipy_on_identical_data():
    rng = np.random.default_rng(3)
    x = rng.lognormal(0, 1.5, P)
    df = make_table(x[None, :], x[None, :], shared=True)
    row = summarize(df, n_boot=4000, seed=9).set_index("method").loc["A"]
    ref = sps.bootstrap((x,), np.mean, method="BCa", n_resamples=4000, rng=np.random.default_rng(9))
    assert row["ci_low"] == pytest.approx(ref.confidence_interval.low, rel=1e-10)
    assert row["ci_high"] == pytest.approx(ref.confidence_interval.high, rel=1e-10)
    # shared prompts: the BCa interval of the seed-averaged per-prompt differences
    a, b = shared_tables(np.random.default_rng(4), 1)
    a = np.abs(a)  # a positive KL so that the log-scale ratio exists
    r = paired_test(make_table(a[0], b[0], True), ("A", 50), ("B", 75), n_boot=3000, seed=2)
    d = (a[0] - b[0]).mean(axis=0)
    ref = sps.bootstrap((d,), np.mean, method="BCa", n_resamples=3000, rng=np.random.default_rng(2))
    assert (r.ci_low, r.ci_high) == (
        pytest.approx(ref.confidence_interval.low, rel=1e-10),
        pytest.approx(ref.confidence_interval.high, rel=1e-10),
    )
    ref = sps.bootstrap(
        (np.log(a[0]).mean(0) - np.log(b[0]).mean(0),),
        np.mean,
        method="BCa",
        n_resamples=3000,
        rng=np.random.default_rng(2),
    )
    assert r.gm_ratio_ci_low == pytest.approx(np.exp(ref.confidence_interval.low), rel=1e-10)


def test_tost_matches_statsmodels_and_hand_computation_with_shared_prompts():
    smw = pytest.importorskip("statsmodels.stats.weightstats")
    a, b = shared_tables(np.random.default_rng(7), 1, true_diff=0.02)
    a = np.abs(a)
    df = make_table(a[0], b[0], True)
    r = tost(df, ("A", 50), ("B", 75), margin=0.15, ratio_margin=0.1)
    am, bm = a[0].mean(axis=0), b[0].mean(axis=0)  # the prompt is the unit: seeds averaged first
    p, lower, upper = smw.ttost_paired(am, bm, -0.15, 0.15)
    assert r.p_value == pytest.approx(p, rel=1e-9)
    assert r.p_lower == pytest.approx(lower[1], rel=1e-9) and r.p_upper == pytest.approx(upper[1], rel=1e-9)
    d = am - bm
    se = d.std(ddof=1) / np.sqrt(P)
    half = sps.t.ppf(0.95, P - 1) * se
    assert (r.n, r.dof) == (P, P - 1) and r.se_diff == pytest.approx(se)
    assert r.equivalence_bound == pytest.approx(max(abs(d.mean() - half), abs(d.mean() + half)))
    la, lb = np.log(a[0]).mean(axis=0), np.log(b[0]).mean(axis=0)
    p_ratio, _, _ = smw.ttost_paired(la, lb, np.log(0.9), np.log(1.1))
    assert r.ratio_p_value == pytest.approx(p_ratio, rel=1e-9)
    assert r.gm_ratio == pytest.approx(np.exp((la - lb).mean()))
    # equivalence iff the margin is above the bound
    assert tost(df, ("A", 50), ("B", 75), margin=r.equivalence_bound * 1.01).equivalent
    assert not tost(df, ("A", 50), ("B", 75), margin=r.equivalence_bound * 0.99).equivalent


# --- design detection and the seed component --------------------------------------------------


def test_design_detection_and_p_seed_t_only_for_seed_specific_prompts():
    a, b = shared_tables(np.random.default_rng(9), 1)
    shared = make_table(a[0], b[0], True).assign(
        method=lambda d: d["method"].map({"A": "fap-synergy", "B": "fap"}), k=50
    )
    out = matched_seed_ablation(shared, ks=[50], n_boot=100)
    pooled = out[out["scope"] == "pooled"].iloc[0]
    assert np.isnan(pooled["p_seed_t"]) and pooled["n_prompts"] == P and pooled["seed_sd_diff"] > 0
    a2, b2 = distinct_tables(np.random.default_rng(9), 1)
    dist = make_table(a2[0], b2[0], False).assign(
        method=lambda d: d["method"].map({"A": "fap-synergy", "B": "fap"}), k=50
    )
    pooled2 = matched_seed_ablation(dist, ks=[50], n_boot=100).query("scope == 'pooled'").iloc[0]
    assert np.isfinite(pooled2["p_seed_t"]) and pooled2["unit"] == "prompt within seed"
    mixed_ids = np.array(["p0", "p0", "p1", "q1"])
    with pytest.raises(DataFormatError, match="seeds"):
        detect_design(np.array([0, 1, 0, 1]), np.array([0, 0, 1, 1]), mixed_ids, "prompt_id")
    d = detect_design(np.array([0, 1, 0, 1]), np.array([0, 0, 1, 1]), np.array(["x", "x", "y", "y"]), "prompt_id")
    assert (d.case, d.n_prompts, d.n_seeds) == ("shared prompts", 2, 2)
