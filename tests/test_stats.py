"""pie_lib.stats on synthetic results tables whose answers are known analytically."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from pie_lib.errors import PieError
from pie_lib.stats import (
    MissingResultError,
    UnpairedDataError,
    bootstrap_indices,
    bootstrap_means,
    crossing_budget,
    effective_budget,
    effective_budget_table,
    format_effective_budget_table,
    matched_seed_ablation,
    paired_test,
    summarize,
    to_latex,
    to_markdown,
    tost,
)

LADDER = [50, 100, 200, 400]


def rows(method: str, k: int, seed: int, values: np.ndarray) -> pd.DataFrame:
    n = len(values)
    return pd.DataFrame(
        {
            "method": method,
            "k": k,
            "seed": seed,
            "prompt_idx": np.arange(n),
            "n_active": 1000,
            "kl": values,
            "pred_change": values > 1.5,
            "faithfulness": 1 - values / 4,
            "completeness": values / 4,
        }
    )


def linear_table(n: int = 40, seeds=(0, 1, 2), ref_level: float = 1.6, slope: float = 0.005) -> pd.DataFrame:
    """Per-prompt offset u_i shared by every cell, so K_eff is exact in every bootstrap resample.

    baseline: kl = u_i + 2 - slope*K (linear in K); reference @50: kl = u_i + ref_level.
    K_eff = (2 - ref_level) / slope (= 80 by default, between ladder points 50 and 100).
    """
    parts = []
    for s in seeds:
        u = np.random.default_rng(100 + s).normal(0, 0.3, n)
        parts.append(rows("fap-synergy", 50, s, u + ref_level))
        for k in LADDER:
            parts.append(rows("fap", k, s, u + 2 - slope * k))
    return pd.concat(parts, ignore_index=True)


# --- bootstrap / summarize -------------------------------------------------------------------


def test_bootstrap_means_equal_index_matrix_means():
    x = np.random.default_rng(0).normal(size=30)
    idx = bootstrap_indices(30, 500, seed=7)
    assert idx.shape == (500, 30)
    np.testing.assert_allclose(bootstrap_means(x, 500, seed=7), x[idx].mean(axis=1), rtol=1e-12)


def test_summarize_matches_pandas_and_is_deterministic():
    df = linear_table()
    out = summarize(df, value="kl", n_boot=400, seed=3)
    again = summarize(df, value="kl", n_boot=400, seed=3)
    other = summarize(df, value="kl", n_boot=400, seed=4)
    pd.testing.assert_frame_equal(out, again)
    assert not np.allclose(out["ci_low"], other["ci_low"])
    row = out[(out["method"] == "fap") & (out["k"] == 100)].iloc[0]
    cell = df[(df["method"] == "fap") & (df["k"] == 100)]
    # same prompt_idx under every seed, no prompt id column: prompts shared by index, the prompt is the unit
    per_prompt = cell.groupby("prompt_idx")["kl"].mean()
    assert (row["n"], row["n_prompts"], row["n_rows"], row["n_seeds"]) == (40, 40, 120, 3)
    assert (row["unit"], row["design"]) == ("prompt", "shared prompts")
    assert row["mean"] == pytest.approx(cell["kl"].mean())
    assert row["std"] == pytest.approx(per_prompt.std(ddof=1))
    assert row["median"] == pytest.approx(per_prompt.median())
    assert row["median_ci_low"] <= row["median"] <= row["median_ci_high"]
    assert row["gmean"] == pytest.approx(np.exp(np.log(cell["kl"]).mean()))
    assert row["ci_low"] < row["mean"] < row["ci_high"]
    seed_means = cell.groupby("seed")["kl"].mean()
    assert row["mean_seed_1"] == pytest.approx(seed_means[1])
    assert row["seed_mean"] == pytest.approx(seed_means.mean())
    assert row["seed_std"] == pytest.approx(seed_means.std(ddof=1))
    assert summarize(df, value="pred_change", n_boot=50)["mean"].between(0, 1).all()


# --- effective budget ------------------------------------------------------------------------


def test_effective_budget_linear_curve_is_exact():
    df = linear_table()
    res = effective_budget(df, "fap-synergy", 50, ["fap"], n_boot=300, seed=0)
    np.testing.assert_allclose(res.per_seed["k_eff"], 80.0)
    assert (res.per_seed["status"] == "ok").all() and list(res.per_seed["seed"]) == [0, 1, 2]
    s = res.summary.iloc[0]
    assert s["k_eff"] == pytest.approx(80.0)
    # offsets cancel in every resample: the CI collapses on the truth
    assert s["ci_low"] == pytest.approx(80.0) and s["ci_high"] == pytest.approx(80.0)
    assert s["frac_no_crossing"] == 0
    assert s["cost_saving"] == pytest.approx(1 - 50 / 80)
    assert s["k_eff_mean"] == pytest.approx(80.0) and s["k_eff_std"] == pytest.approx(0.0, abs=1e-9)
    assert s["n_seeds"] == 3 and s["n_seeds_crossed"] == 3


def test_crossing_interpolates_on_uneven_ladder_and_takes_first_crossing():
    ladder = np.array([50.0, 75.0, 200.0, 800.0])
    # crosses 1.0 between 75 (1.3) and 200 (0.8): 75 + 125 * 0.3 / 0.5 = 150
    assert crossing_budget(ladder, np.array([1.5, 1.3, 0.8, 0.5]), np.array(1.0)) == pytest.approx(150.0)
    # non-monotone: 1.5 -> 0.9 -> 1.2 -> 0.5 reaches 1.0 first on [50, 75]: 50 + 25 * 0.5 / 0.6
    assert crossing_budget(ladder, np.array([1.5, 0.9, 1.2, 0.5]), np.array(1.0)) == pytest.approx(50 + 25 * 0.5 / 0.6)
    # exact hit on a ladder point, and at the first point
    assert crossing_budget(ladder, np.array([1.5, 1.0, 0.8, 0.5]), np.array(1.0)) == pytest.approx(75.0)
    assert crossing_budget(ladder, np.array([1.0, 0.9, 0.8, 0.5]), np.array(1.0)) == pytest.approx(50.0)
    # never reached -> inf; already better at K_1 -> NaN (no extrapolation either way)
    assert np.isposinf(crossing_budget(ladder, np.array([1.5, 1.4, 1.3, 1.2]), np.array(1.0)))
    assert np.isnan(crossing_budget(ladder, np.array([0.9, 0.8, 0.7, 0.6]), np.array(1.0)))
    # higher-is-better metrics, vectorised over a batch of curves
    out = crossing_budget(
        ladder, np.array([[0.2, 0.4, 0.9, 1.0], [0.1, 0.2, 0.3, 0.4]]), np.array([0.6, 0.6]), better="higher"
    )
    assert out[0] == pytest.approx(75 + 125 * 0.2 / 0.5) and np.isposinf(out[1])


def test_effective_budget_no_crossing_is_flagged():
    df = linear_table(ref_level=-1.0)  # reference far better than the baseline's best (2 - 2 = 0)
    res = effective_budget(df, "fap-synergy", 50, ["fap"], n_boot=200)
    s = res.summary.iloc[0]
    assert np.isposinf(s["k_eff"]) and s["status"] == "above_ladder"
    assert s["frac_above"] == 1.0 and s["frac_no_crossing"] == 1.0
    assert np.isposinf(s["ci_low"]) and np.isposinf(s["ci_high"]) and np.isnan(s["cost_saving"])
    assert np.isposinf(s["k_eff_mean"])
    below = effective_budget(linear_table(ref_level=3.0), "fap-synergy", 50, ["fap"], n_boot=200).summary.iloc[0]
    assert np.isnan(below["k_eff"]) and below["status"] == "below_ladder" and below["frac_below"] == 1.0


def test_effective_budget_partial_crossing_ci_reaches_inf():
    # the reference sits just at the baseline's last ladder point, with independent noise
    rng = np.random.default_rng(0)
    parts = [rows("fap-synergy", 50, 0, 1.0 + rng.normal(0, 0.3, 60))]
    for k in LADDER:
        parts.append(rows("fap", k, 0, 2 - 0.0025 * k + rng.normal(0, 0.3, 60)))
    s = effective_budget(pd.concat(parts), "fap-synergy", 50, ["fap"], n_boot=500).summary.iloc[0]
    assert 0.025 < s["frac_above"] < 0.975 and np.isposinf(s["ci_high"]) and np.isfinite(s["ci_low"])


def test_effective_budget_bootstrap_is_deterministic():
    rng = np.random.default_rng(1)
    df = linear_table()
    df["kl"] = df["kl"] + rng.normal(0, 0.2, len(df))
    a = effective_budget(df, "fap-synergy", 50, ["fap"], n_boot=300, seed=5)
    b = effective_budget(df, "fap-synergy", 50, ["fap"], n_boot=300, seed=5)
    c = effective_budget(df, "fap-synergy", 50, ["fap"], n_boot=300, seed=6)
    pd.testing.assert_frame_equal(a.summary, b.summary)
    pd.testing.assert_frame_equal(a.per_seed, b.per_seed)
    assert a.summary["ci_low"].iloc[0] != c.summary["ci_low"].iloc[0]


# --- paired tests and TOST -------------------------------------------------------------------


def pair_table(shift: float, n: int = 200, noise: float = 0.05, seeds=(0, 1)) -> pd.DataFrame:
    parts = []
    for s in seeds:
        rng = np.random.default_rng(s)
        u = rng.gamma(4, 0.3, n)
        parts.append(rows("fap-synergy", 50, s, u + shift + rng.normal(0, noise, n)))
        parts.append(rows("fap", 75, s, u + rng.normal(0, noise, n)))
    return pd.concat(parts, ignore_index=True)


def test_paired_test_matches_scipy():
    df = pair_table(0.03, seeds=(0,))
    r = paired_test(df, ("fap-synergy", 50), ("fap", 75), n_boot=500)
    a = df[df["method"] == "fap-synergy"].sort_values(["seed", "prompt_idx"])["kl"].to_numpy()
    b = df[df["method"] == "fap"].sort_values(["seed", "prompt_idx"])["kl"].to_numpy()
    d = a - b
    assert r.n == r.n_prompts == 200 and r.n_seeds == 1 and r.unit == "prompt"
    assert r.mean_diff == pytest.approx(d.mean())
    assert r.p_t == pytest.approx(sps.ttest_rel(a, b).pvalue, rel=1e-10)
    assert r.t_stat == pytest.approx(sps.ttest_rel(a, b).statistic, rel=1e-10)
    assert r.p_wilcoxon == pytest.approx(sps.wilcoxon(a, b).pvalue, rel=1e-10)
    assert r.cohens_dz == pytest.approx(d.mean() / d.std(ddof=1))
    assert r.ci_low < r.mean_diff < r.ci_high
    assert list(r.diffs.columns) == ["seed", "prompt_idx", "a", "b", "diff"]
    again = paired_test(df, ("fap-synergy", 50), ("fap", 75), n_boot=500)
    assert (again.ci_low, again.ci_high) == (r.ci_low, r.ci_high)
    # two seeds on the same prompt indexes: the prompt is the unit, seeds averaged within it
    two = pair_table(0.03)
    r2 = paired_test(two, ("fap-synergy", 50), ("fap", 75), n_boot=200)
    cells = {m: two[two["method"] == m].groupby("prompt_idx")["kl"].mean() for m in ("fap-synergy", "fap")}
    assert (r2.n, r2.n_rows, r2.n_seeds) == (200, 400, 2)
    assert r2.p_t == pytest.approx(sps.ttest_rel(cells["fap-synergy"], cells["fap"]).pvalue, rel=1e-10)


def test_tost_matches_hand_computation():
    a = np.array([1.10, 0.95, 1.30, 1.02, 0.88, 1.21, 1.05, 0.99])
    b = np.array([1.08, 0.97, 1.26, 1.05, 0.90, 1.18, 1.01, 1.00])
    df = pd.concat([rows("fap-synergy", 50, 0, a), rows("fap", 75, 0, b)])
    r = tost(df, ("fap-synergy", 50), ("fap", 75), margin=0.05)
    d = a - b
    n, dbar, sd = 8, d.mean(), d.std(ddof=1)
    se = sd / np.sqrt(n)
    t1, t2 = (dbar + 0.05) / se, (dbar - 0.05) / se
    p1, p2 = 1 - sps.t.cdf(t1, n - 1), sps.t.cdf(t2, n - 1)
    assert r.t_lower == pytest.approx(t1) and r.t_upper == pytest.approx(t2)
    assert r.p_lower == pytest.approx(p1) and r.p_upper == pytest.approx(p2)
    assert r.p_value == pytest.approx(max(p1, p2))
    # the same one-sided tests through scipy
    assert r.p_lower == pytest.approx(sps.ttest_1samp(d, -0.05, alternative="greater").pvalue)
    assert r.p_upper == pytest.approx(sps.ttest_1samp(d, 0.05, alternative="less").pvalue)
    half = sps.t.ppf(0.95, n - 1) * se
    assert (r.ci_low, r.ci_high) == (pytest.approx(dbar - half), pytest.approx(dbar + half))
    assert r.equivalent == (max(p1, p2) < 0.05) == (-0.05 < r.ci_low and r.ci_high < 0.05)
    rel = tost(df, ("fap-synergy", 50), ("fap", 75), margin=0.05, relative=True)
    assert rel.delta == pytest.approx(0.05 * b.mean())


def test_tost_equivalent_iff_within_margin():
    same = tost(pair_table(0.0), margin=0.05)
    assert same.equivalent and same.p_value < 0.05
    shifted = tost(pair_table(0.3), margin=0.05)
    assert not shifted.equivalent and shifted.p_value > 0.5
    with pytest.raises(ValueError):
        tost(pair_table(0.0), margin=0.0)


# --- matched-seed ablation -------------------------------------------------------------------


def test_matched_seed_ablation_per_seed_and_pooled():
    parts = []
    effect = {50: 0.1, 100: 0.02, 400: 0.0}  # ablated - full; identical selections at K=400
    for s in (0, 1, 2):
        rng = np.random.default_rng(s)
        for k, e in effect.items():
            u = rng.gamma(4, 0.3, 100)
            noise = rng.normal(0, 0.02, 100) if e else 0.0
            parts.append(rows("fap-synergy", k, s, u))
            parts.append(rows("fap", k, s, u + e + noise))
    out = matched_seed_ablation(pd.concat(parts), "fap-synergy", "fap")
    assert sorted(out["k"].unique()) == [50, 100, 400]
    assert len(out) == 3 * 4 and (out["scope"] == "pooled").sum() == 3
    pooled = out[out["scope"] == "pooled"].set_index("k")
    assert pooled.loc[50, "mean_diff"] == pytest.approx(0.1, abs=0.01) and pooled.loc[50, "p_t"] < 1e-10
    # seeds share prompt indexes (no prompt id): 100 prompts; p_seed_t only for seed-specific prompts
    assert pooled.loc[50, "n"] == 100 and pooled.loc[50, "n_seeds"] == 3 and np.isnan(pooled.loc[50, "p_seed_t"])
    assert pooled.loc[400, "mean_diff"] == 0 and np.isnan(pooled.loc[400, "p_t"])
    seed_rows = out[(out["scope"] == "seed") & (out["k"] == 50)]
    assert list(seed_rows["seed"]) == [0, 1, 2] and (seed_rows["ci_low"] > 0).all()
    with pytest.raises(MissingResultError, match="K=\\[50, 100, 400\\]|budgets"):
        matched_seed_ablation(pd.concat(parts), ks=[75])


# --- errors ----------------------------------------------------------------------------------


def test_unpaired_and_missing_cells_raise_clear_errors():
    df = pair_table(0.0)
    unpaired = df.drop(df.index[(df["method"] == "fap") & (df["prompt_idx"] == 3)])
    with pytest.raises(UnpairedDataError, match="only in") as e:
        paired_test(unpaired)
    assert isinstance(e.value, PieError) and isinstance(e.value, ValueError)
    with pytest.raises(MissingResultError, match="methods present: \\['fap', 'fap-synergy'\\]"):
        tost(df, ("clt-relp", 75), ("fap", 75))
    with pytest.raises(MissingResultError, match="no rows at K=100; its budgets: \\[75\\]"):
        paired_test(df, ("fap-synergy", 50), ("fap", 100))
    with pytest.raises(MissingResultError, match="seed"):
        paired_test(df, seeds=[0, 9])
    other_seeds = df.assign(seed=np.where(df["method"] == "fap", df["seed"] + 10, df["seed"]))
    with pytest.raises(UnpairedDataError):
        tost(other_seeds)
    lin = linear_table()
    with pytest.raises(UnpairedDataError):
        effective_budget(lin[~((lin["k"] == 200) & (lin["prompt_idx"] == 0))], baselines=["fap"], n_boot=10)
    with pytest.raises(MissingResultError, match="random"):
        effective_budget(lin, baselines=["random"], n_boot=10)
    with pytest.raises(PieError, match="lacks column"):
        summarize(lin.drop(columns="seed"))


# --- report table ----------------------------------------------------------------------------


def test_effective_budget_table_and_writers():
    df = linear_table()
    df = pd.concat([df, df[(df["method"] == "fap") & (df["k"] == 50)].assign(k=75, kl=lambda d: d["kl"] - 0.125)])
    rnd = df[df["method"] == "fap"].assign(method="random", kl=lambda d: d["kl"] + 5)
    table = effective_budget_table(pd.concat([df, rnd]), n_boot=200, margin=0.05)
    assert list(table["baseline"]) == ["fap", "random"]
    fap = table.set_index("baseline").loc["fap"]
    assert fap["k_eff"] == pytest.approx(80.0) and fap["cost_saving"] == pytest.approx(0.375)
    # fap@75 = u + 2 - 0.25 - 0.125 ... 75-row: kl(50) - 0.125 = u + 1.625 vs reference u + 1.6
    assert fap["mean_diff"] == pytest.approx(-0.025)
    assert np.isposinf(table.set_index("baseline").loc["random", "k_eff"])
    pretty = format_effective_budget_table(table)
    assert pretty.loc[1, "K_eff (seeds)"] == "> 400"
    assert pretty.loc[0, "K_eff (seeds)"].startswith("80.0 ± 0.0")
    md = to_markdown(pretty)
    assert md.splitlines()[0].startswith("| Baseline") and md.count("\n") == 4
    tex = to_latex(pretty, caption="Effective budget", label="tab:eb")
    assert r"\toprule" in tex and r"$\pm$" in tex and r"\%" in tex and r"\label{tab:eb}" in tex
    assert "k_eff" in to_markdown(table)
