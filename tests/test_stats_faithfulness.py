"""MIB faithfulness / completeness as ratios of means, CPR / CMD on the aggregate (issue 11, item 5)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pie_lib.errors import BudgetError
from pie_lib.stats.faithfulness import mib_cpr_cmd, mib_faithfulness, per_prompt_ratios


def frac_rows(method: str, fracs, clean, null, circuit, seeds=(0,)) -> pd.DataFrame:
    """Rows of a fraction ladder: ``circuit[j][i]`` = m_circuit of prompt i at fraction j."""
    out = []
    for s in seeds:
        for j, f in enumerate(fracs):
            for i in range(len(clean)):
                out.append(
                    {
                        "method": method,
                        "k": f,
                        "budget": "frac",
                        "seed": s,
                        "prompt_idx": i,
                        "m_clean": clean[i],
                        "m_null": null[i],
                        "m_circuit": circuit[j][i],
                        "m_complement": null[i] + 0.5 * (clean[i] - null[i]),
                    }
                )
    return pd.DataFrame(out)


def test_ratio_of_means_not_mean_of_ratios_and_small_gaps_counted():
    clean = np.array([4.0, 3.0, 0.05, 5.0])
    null = np.array([0.0, 1.0, 0.0, 1.0])
    circ = np.array([3.0, 2.0, 0.5, 4.0])  # prompt 2: gap 0.05, its own ratio is 10
    df = frac_rows("fap", [0.5], clean, null, [circ])
    r = mib_faithfulness(df, min_gap=0.1, n_boot=500).iloc[0]
    want = (circ.mean() - null.mean()) / (clean.mean() - null.mean())
    assert r["faithfulness"] == pytest.approx(want)
    ratios = (circ - null) / (clean - null)
    assert r["mean_of_ratios"] == pytest.approx(ratios.mean()) and r["mean_of_ratios"] > 2 * r["faithfulness"]
    assert r["n_small_gap"] == 1 and r["n_undefined"] == 0 and r["n_prompts"] == 4
    assert r["ci_low"] <= r["faithfulness"] <= r["ci_high"]
    pp = per_prompt_ratios(df, min_gap=0.1)
    assert pp["small_gap"].tolist() == [False, False, True, False]
    np.testing.assert_allclose(pp["ratio"], ratios)
    comp = mib_faithfulness(df, which="completeness", n_boot=100).iloc[0]
    assert comp["completeness"] == pytest.approx(0.5)


def test_cpr_cmd_hand_computed_on_the_aggregate_curve():
    clean, null = np.array([2.0, 4.0]), np.array([0.0, 0.0])
    # aggregate F(0.5) = (1 + 2.6) / 6 = 0.6, F(1) = 1
    df = frac_rows("fap", [0.5, 1.0], clean, null, [np.array([1.0, 2.6]), clean], seeds=(0, 1, 2))
    areas, curve = mib_cpr_cmd(df, n_boot=200)
    a = areas.iloc[0]
    assert a["cpr"] == pytest.approx(0.5 * 0.6 / 2 + 0.5 * 1.6 / 2)
    assert a["cmd"] == pytest.approx(0.5 * 1.4 / 2 + 0.5 * 0.4 / 2)
    assert (a["n_prompts"], a["n_seeds"], a["unit"]) == (2, 3, "prompt")
    assert curve["size_frac"].tolist() == [0.0, 0.5, 1.0]
    np.testing.assert_allclose(curve["faithfulness"], [0.0, 0.6, 1.0])


def test_cpr_cmd_refuses_a_ladder_short_of_one_and_absolute_only_tables():
    clean, null = np.array([2.0, 4.0]), np.array([0.0, 0.0])
    short = frac_rows("fap", [0.1, 0.5], clean, null, [clean * 0.2, clean * 0.7])
    with pytest.raises(BudgetError, match="reach 1.0"):
        mib_cpr_cmd(short)
    with pytest.raises(BudgetError, match="k-frac"):
        mib_cpr_cmd(short.assign(budget="abs"))
