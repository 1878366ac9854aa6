"""pie_lib.report: table builders and figure functions on synthetic result tables, notebook plumbing."""

from __future__ import annotations

import json

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from pie_lib.errors import PieError, WeightsUnavailableError  # noqa: E402
from pie_lib.experiments import notebook, runs, world  # noqa: E402
from pie_lib.report import paper_numbers, plots, tables  # noqa: E402
from pie_lib.selections import query_selections  # noqa: E402

METHODS = ["fap", "fap-synergy", "clt-relp", "act-mag", "random"]
BASE = {"fap": 1.0, "fap-synergy": 0.9, "clt-relp": 1.02, "act-mag": 1.4, "random": 1.8}


def synthetic_results(
    seeds=(0, 1, 2), n_prompts=8, ks=(50, 75, 100, 200), fracs=(0.05, 0.1), n_active=150, tasks=("ioi", "docstring")
) -> pd.DataFrame:
    """Rows shaped like run_prune's: KL falls with K, FAP-Synergy a little below FAP."""
    rng = np.random.default_rng(0)
    rows = []
    for task in tasks:
        for seed in seeds:
            for p in range(n_prompts):
                hard = rng.uniform(0.8, 1.2)
                for m in METHODS:
                    for budget, values in (("abs", ks), ("frac", fracs)):
                        for k in values:
                            keff = min(k, n_active) if budget == "abs" else int(np.ceil(k * n_active))
                            kl = BASE[m] * hard * np.exp(-keff / 120) + rng.normal(0, 0.01) ** 2
                            f = 1 - kl / 2
                            rows.append(
                                dict(
                                    method=m,
                                    k=k,
                                    budget=budget,
                                    seed=seed,
                                    prompt_idx=p,
                                    n_active=n_active,
                                    k_eff=keff,
                                    n_kept=keff,
                                    kl=kl,
                                    pred_change=bool(kl > 1.0),
                                    faithfulness=f,
                                    completeness=1 - f,
                                    m_clean=3.0,
                                    m_null=0.0,
                                    m_circuit=3 * f,
                                    m_complement=3 * (1 - f),
                                    kl_null=2.0,
                                    task=task,
                                    seconds=0.1,
                                )
                            )
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def df() -> pd.DataFrame:
    return synthetic_results()


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _selections():
    """Two methods at K=50 on two prompts; feature (0, 1) shared by both."""
    return [
        {
            "method": "fap",
            "k": 50,
            "budget": "abs",
            "seed": 0,
            "prompt_idx": 0,
            "n_active": 9,
            "occurrences": [[0, 1, 1], [0, 2, 1], [1, 3, 5]],
            "scores": [1, 1, 1],
        },
        {
            "method": "fap",
            "k": 50,
            "budget": "abs",
            "seed": 0,
            "prompt_idx": 1,
            "n_active": 9,
            "occurrences": [[2, 1, 7]],
            "scores": [1],
        },
        {
            "method": "fap-synergy",
            "k": 50,
            "budget": "abs",
            "seed": 0,
            "prompt_idx": 0,
            "n_active": 9,
            "occurrences": [[0, 1, 1], [3, 2, 9]],
            "scores": [1, 1],
        },
        {
            "method": "fap-synergy",
            "k": 75,
            "budget": "abs",
            "seed": 0,
            "prompt_idx": 0,
            "n_active": 9,
            "occurrences": [[0, 1, 1], [3, 2, 9], [3, 3, 8]],
            "scores": [1, 1, 1],
        },
    ]


# --------------------------------------------------------------------------- tables
def test_write_table_writes_csv_markdown_latex(tmp_path):
    t = pd.DataFrame({"Method": ["FAP_x", "FAP-Synergy"], "K=50": ["1.22±0.56", "1.33±0.60"], "v": [0.5, np.nan]})
    data = pd.DataFrame({"a": [1.5, 2.25]})
    paths = tables.write_table(t, "demo", tmp_path / "tables", caption="A caption", data=data)
    assert {p.suffix for p in paths.values()} == {".csv", ".md", ".tex"}
    assert pd.read_csv(paths["csv"]).equals(data)
    md = paths["md"].read_text()
    assert md.startswith("**A caption**") and "| Method" in md and "FAP-Synergy" in md
    tex = paths["tex"].read_text()
    assert r"\begin{tabular}" in tex and r"FAP\_x" in tex and r"$\pm$" in tex and r"\label{tab:demo}" in tex


def test_kl_summary_matches_pandas_and_flags_clipping(df):
    d = df.copy()
    d.loc[(d["k"] == 200) & (d["budget"] == "abs"), "k_eff"] = 150  # clipped to the active set
    s = tables.kl_summary(d, ks=[50, 100, 200])
    ref = d[(d.budget == "abs") & (d.task == "ioi") & (d.method == "fap") & (d.k == 100)]["kl"]
    row = s[(s.task == "ioi") & (s.method == "fap") & (s.k == 100)].iloc[0]
    # 8 prompts shared by 3 seeds: the prompt is the unit (seeds averaged within it), not the 24 rows
    per_prompt = d.loc[ref.index].groupby("prompt_idx")["kl"].mean()
    assert len(ref) == 24 and (row["n"], row["n_prompts"], row["n_seeds"], row["unit"]) == (8, 8, 3, "prompt")
    assert row["mean"] == pytest.approx(ref.mean()) and row["std"] == pytest.approx(per_prompt.std(ddof=1))
    assert s[s.k == 200]["clipped"].eq(1.0).all() and s[s.k == 50]["clipped"].eq(0.0).all()
    assert s[s.task == "ioi"]["method"].drop_duplicates().tolist() == [
        "fap",
        "fap-synergy",
        "clt-relp",
        "act-mag",
        "random",
    ]
    t = tables.format_kl_table(s, model="toy")
    assert list(t.columns) == ["Model", "Task", "Method", "K=50", "K=100", "K=200"]
    assert t["K=200"].str.endswith("*").all() and not t["K=50"].str.endswith("*").any()
    cell = t[(t.Task == "ioi") & (t.Method == "FAP")]["K=100"].iloc[0]
    assert cell == f"{row['mean']:.2f}±{row['std']:.2f}"


def test_effective_budget_means_is_the_papers_line(df):
    fmt, num = tables.effective_budget_means(df[df.task == "ioi"], "fap-synergy", 50, 75, ["fap", "clt-relp"])
    assert list(fmt.columns) == ["Model", "FAP-Synergy K=50", "FAP K=75", "CLT-RelP K=75", "Prompts × seeds"]
    assert fmt["Prompts × seeds"].iloc[0] == "8 × 3 (prompt)"
    x = df[(df.task == "ioi") & (df.method == "fap") & (df.k == 75) & (df.budget == "abs")]["kl"]
    assert num.set_index("method").loc["fap", "mean"] == pytest.approx(x.mean())
    assert num["n"].eq(8).all() and num["n_seeds"].eq(3).all() and num["seed_std"].notna().all()


def test_format_ablation_table(df):
    from pie_lib.stats import matched_seed_ablation

    d = df[(df.task == "ioi") & (df.budget == "abs")]
    abl = matched_seed_ablation(d, full="fap-synergy", ablated="fap", n_boot=200)
    t = tables.format_ablation_table(abl)
    assert t.columns[3:5].tolist() == ["FAP", "FAP-Synergy"]
    assert t["Scope"].tolist()[:4] == ["pooled", "seed 0", "seed 1", "seed 2"]
    pooled = abl[(abl.scope == "pooled") & (abl.k == 50)].iloc[0]
    assert t.iloc[0]["Δ [95% CI]"].startswith(f"{pooled['mean_diff']:+.3f}")
    assert pooled["mean_diff"] > 0  # synergy's KL is lower in the synthetic data


def test_fade_by_method_counts_each_feature_once():
    fade = pd.DataFrame(
        {
            "layer": [0, 1, 2, 3, 3],
            "feature": [1, 5, 7, 9, 8],
            "clarity": [0.8, 0.6, 0.4, 1.0, 0.0],
            "responsiveness": [0.5] * 5,
            "purity": [0.2, 0.4, 0.6, 0.8, 1.0],
            "faithfulness": [np.nan, 0.1, 0.3, np.nan, 0.9],
        }
    )
    by = tables.fade_by_method(fade, _selections(), k=50)
    fap = by.set_index("method").loc["fap"]
    assert fap["n_features"] == 3 and fap["clarity_mean"] == pytest.approx((0.8 + 0.6 + 0.4) / 3)
    assert fap["faithfulness_mean"] == pytest.approx(0.2)  # NaN-aware
    syn = by.set_index("method").loc["fap-synergy"]
    assert syn["n_features"] == 2 and syn["clarity_mean"] == pytest.approx(0.9)
    t = tables.format_fade_table(by)
    cols = ["Model", "Method", "Features", "Clarity", "Purity", "Responsiveness", "Faithfulness", "Undefined"]
    assert list(t.columns) == cols
    assert t.iloc[0]["Features"] == "3/3"
    # per metric: how many features have a score, and why the others have none
    assert fap["faithfulness_n"] == 2 and fap["faithfulness_undefined"] == 1 and fap["clarity_undefined"] == 0
    assert fap["faithfulness_why"] == "reason not recorded" and "(n=2)" in t.iloc[0]["Faithfulness"]
    why = fade.assign(
        faithfulness_status=[
            "skipped: clarity or responsiveness < 0.5 (FADE gate)",
            "computed",
            "computed",
            "not computed: no description",
            "computed",
        ]
    )
    t2 = tables.format_fade_table(tables.fade_by_method(why, _selections(), k=50))
    assert t2.iloc[0]["Undefined"] == "faithfulness: skipped: clarity or responsiveness < 0.5 (FADE gate): 1"


def test_paper_comparison_places_ours_next_to_the_paper(df):
    kl = tables.kl_summary(df, ks=[50, 100, 200])
    _, eb = tables.effective_budget_means(df[df.task == "ioi"])
    fade = pd.DataFrame(
        [
            {
                "method": "fap-synergy",
                "k": 50,
                "clarity_mean": 0.7,
                "clarity_std": 0.1,
                "purity_mean": 0.5,
                "purity_std": 0.1,
                "responsiveness_mean": 0.6,
                "responsiveness_std": 0.1,
            }
        ]
    )
    fmt, num = tables.paper_comparison(kl, eb, fade, ours="toy (ours)")
    assert list(fmt.columns) == ["Quantity", "Method", "K", "Llama-3.2-1B (paper)", "Gemma-2-2B (paper)", "toy (ours)"]
    row = fmt[(fmt.Quantity == "IOI last-token KL") & (fmt.Method == "FAP") & (fmt.K == 50)].iloc[0]
    assert row["Llama-3.2-1B (paper)"] == "1.33±0.60" and row["Gemma-2-2B (paper)"] == "0.91±0.46"
    ours = kl[(kl.task == "ioi") & (kl.method == "fap") & (kl.k == 50)].iloc[0]
    assert row["toy (ours)"] == f"{ours['mean']:.2f}±{ours['std']:.2f}"
    red = num[(num.quantity.str.startswith("KL reduction")) & (num.k == 50) & (num.source == "Llama-3.2-1B")]
    assert red["mean"].iloc[0] == pytest.approx(100 * (1.33 - 1.22) / 1.33)
    fr = fmt[fmt.Quantity == "FADE clarity (Doc-String)"].iloc[0]
    assert fr["Llama-3.2-1B (paper)"] == "0.765" and fr["toy (ours)"] == "0.700±0.100"
    # without our numbers the paper's column is still complete
    fmt2, _ = tables.paper_comparison()
    assert (fmt2["toy"] == "–").all() and (fmt2["Gemma-2-2B (paper)"] != "–").all()


def test_paper_numbers_are_complete():
    for model, by_method in paper_numbers.IOI_KL.items():
        assert set(by_method) == {"clt-relp", "fap", "fap-synergy", "act-mag"}
        for cells in by_method.values():
            assert set(cells) == {50, 100, 200}
    assert paper_numbers.EFFECTIVE_BUDGET["Llama-3.2-1B"][("fap-synergy", 50)] == 1.22
    assert paper_numbers.FADE_DOCSTRING_K50["Gemma-2-2B"]["purity"] == 0.675
    assert "2604.16889" in paper_numbers.CITATION


def test_metrics_summary_and_format(df):
    m = tables.metrics_summary(df)
    assert {"kl", "pred_change", "faithfulness", "completeness", "k_eff_mean", "n"} <= set(m.columns)
    t = tables.format_metrics_table(m)
    assert "5%" in set(t["K"]) and "50" in set(t["K"]) and "FAP-Synergy" in set(t["Method"])


def test_sensitivity_table_and_format(df):
    d = df[(df.task == "ioi") & (df.budget == "abs") & df.k.isin([50, 100])]
    parts = []
    for lam in (0.0, 3.0):
        for bp in (25.0, 50.0):
            syn = d[d.method == "fap-synergy"].assign(kl=lambda x, lam=lam: x.kl * (1 - 0.01 * lam), lam=lam, bp=bp)
            parts.append(syn)
    parts.append(d[d.method == "fap"].assign(lam=0.0, bp=25.0))
    grid = pd.concat(parts)
    s = tables.sensitivity_table(grid)
    assert len(s) == 2 * 2 * 2 and s["diff"].notna().all()
    r = s[(s.k == 50) & (s.lam == 3.0)].iloc[0]
    assert r["diff"] == pytest.approx(r["mean"] - d[(d.method == "fap") & (d.k == 50)]["kl"].mean())
    w = tables.format_sensitivity_table(s)
    assert list(w.columns) == ["K", "λ", "bp=25", "bp=50", "FAP"] and len(w) == 4


def test_top_descriptions_cost_table_combine_and_merge():
    desc = pd.DataFrame({"layer": [0, 3], "feature": [1, 9], "description": ["names", "params"]})
    top = tables.top_descriptions(desc, _selections(), "fap", 50, n=2)
    # (0, 1) is kept at two positions of one circuit: it counts once; features without a description show "–"
    assert top.iloc[0].tolist() == [0, 1, 1, "names"] and top.iloc[1].tolist() == [1, 5, 1, "–"]
    from pie_lib.interpret.costs import BudgetCostSaving

    cost = BudgetCostSaving(
        table=pd.DataFrame(
            [
                {
                    "k": 50,
                    "method": "fap-synergy",
                    "n_circuits": 2,
                    "features_per_circuit": 3.0,
                    "n_unique_features": 4,
                    "calls_per_circuit": 3.0,
                    "total_tokens_per_circuit": 300.0,
                },
                {
                    "k": 75,
                    "method": "fap",
                    "n_circuits": 2,
                    "features_per_circuit": 4.0,
                    "n_unique_features": 6,
                    "calls_per_circuit": 4.0,
                    "total_tokens_per_circuit": 400.0,
                },
            ]
        ),
        saving={"calls_union": 1 / 3, "calls_per_circuit": 0.25, "total_tokens_per_circuit": 0.25},
    )
    ct = tables.format_cost_table(cost)
    assert ct.iloc[-1]["Calls / circuit"] == "25%" and ct.iloc[0]["Method"] == "FAP-Synergy"
    a = synthetic_results(seeds=(0,), n_prompts=2, tasks=("ioi",))
    both = tables.combine_runs(a, a.assign(kl=-1.0))
    assert len(both) == len(a) and (both["kl"] >= 0).all()
    cpr = pd.DataFrame(
        {"method": ["fap", "hap"], "cpr": [0.5, 0.6], "cpr_std": [0.1, 0.1], "cmd": [0.4, 0.3], "cmd_std": [0.1, 0.1]}
    )
    rt = pd.DataFrame(
        {
            "method": ["fap", "hap"],
            "seconds_per_prompt": [0.01, 1.0],
            "seconds_select": [0.1, 10.0],
            "seconds_context": [0.5, 0.5],
        }
    )
    assert tables.merge_cpr_runtime(cpr, rt)["seconds_per_prompt"].tolist() == [0.01, 1.0]
    t = tables.cpr_cmd_runtime_table(cpr, rt)
    assert t["Method"].tolist() == ["FAP", "HAP"] and t.iloc[1]["Seconds / prompt"] == "1.000"


def test_toy_world_table_flattens_summary():
    summary = {"archs": {"llama": {"ioi_acc": 1.0, "fvu": [0.1, 0.2], "seeds": {"lm": 0}, "name": "x"}}}
    t = tables.toy_world_table(summary)
    assert set(t["quantity"]) == {"ioi_acc", "fvu[0]", "fvu[1]", "seeds.lm"}


# --------------------------------------------------------------------------- figures
def _files(tmp_path, name):
    png, pdf = tmp_path / f"{name}.png", tmp_path / f"{name}.pdf"
    assert png.stat().st_size > 1000 and pdf.stat().st_size > 1000
    assert png.read_bytes()[:4] == b"\x89PNG" and pdf.read_bytes()[:4] == b"%PDF"
    return png, pdf


def test_plot_metric_vs_k_writes_png_and_pdf_byte_stable(tmp_path, df):
    plots.plot_metric_vs_k(df, tmp_path, "kl", metrics=["kl", "faithfulness"], budget="abs", n_boot=100)
    png, pdf = _files(tmp_path, "kl")
    assert b"CreationDate" not in pdf.read_bytes()
    first = png.read_bytes(), pdf.read_bytes()
    plt.close("all")
    plots.plot_metric_vs_k(df, tmp_path, "kl", metrics=["kl", "faithfulness"], budget="abs", n_boot=100)
    assert (png.read_bytes(), pdf.read_bytes()) == first  # reruns give identical files
    plots.plot_metric_vs_k(df, tmp_path, "klf", budget="frac", tasks=["ioi"], n_boot=100)
    _files(tmp_path, "klf")
    with pytest.raises(ValueError, match="budget"):
        plots.plot_metric_vs_k(df[df.budget == "abs"], tmp_path, "none", budget="frac")


def test_plot_effective_budget_and_seed_ablation(tmp_path, df):
    from pie_lib.stats import effective_budget_table, matched_seed_ablation

    d = df[(df.task == "ioi") & (df.budget == "abs")]
    eb = effective_budget_table(d, "fap-synergy", 50, 75, ["fap", "clt-relp"], n_boot=200)
    fig = plots.plot_effective_budget(d, tmp_path, "eb", baselines=["fap", "clt-relp"], eb_table=eb, n_boot=200)
    _files(tmp_path, "eb")
    assert len(fig.axes) == 2
    abl = matched_seed_ablation(d, n_boot=100)
    plots.plot_seed_ablation(abl, tmp_path, "abl")
    _files(tmp_path, "abl")


def test_plot_related_sensitivity_fade_world(tmp_path, df):
    cpr = pd.DataFrame(
        {
            "method": ["fap", "hap", "edge-pruning"],
            "cpr": [0.5, 0.6, 0.55],
            "cpr_std": [0.1, np.nan, 0.1],
            "cmd": [0.4, 0.3, 0.35],
            "cmd_std": [0.1, 0.1, 0.1],
        }
    )
    rt = pd.DataFrame({"method": ["fap", "hap", "edge-pruning"], "seconds_per_prompt": [0.01, 1.0, 2.0]})
    plots.plot_cpr_cmd(cpr, tmp_path, "cpr", runtime=rt)
    _files(tmp_path, "cpr")
    curve = pd.DataFrame(
        {
            "method": ["fap"] * 3 + ["hap"] * 3,
            "size_frac": [0.05, 0.1, 0.2] * 2,
            "faithfulness": [0.2, 0.5, 0.8, 0.3, 0.6, 0.9],
        }
    )
    plots.plot_faithfulness_curves(curve, tmp_path, "curve")
    _files(tmp_path, "curve")
    per_prompt = pd.concat(
        [
            curve.assign(
                prompt_idx=i, seed=0, budget="frac", k=curve["size_frac"], faithfulness=curve["faithfulness"] + 0.1 * i
            )
            for i in range(3)
        ]
    )
    plots.plot_faithfulness_curves(per_prompt, tmp_path, "curve_p")
    _files(tmp_path, "curve_p")
    sens = pd.DataFrame(
        [
            {"k": k, "lam": lam, "bp": bp, "mean": 0.5 + 0.01 * lam, "diff": -0.01 * lam}
            for k in (50, 100)
            for lam in (0, 3)
            for bp in (25, 50)
        ]
    )
    plots.plot_sensitivity(sens, tmp_path, "sens")
    _files(tmp_path, "sens")
    by = pd.DataFrame(
        [
            {
                "method": m,
                "n_scored": 3,
                **{f"{k}_mean": 0.5 for k in tables.FADE_METRICS},
                **{f"{k}_std": np.nan for k in tables.FADE_METRICS},
            }
            for m in ("fap", "fap-synergy")
        ]
    )
    plots.plot_fade(by, tmp_path, "fade")
    _files(tmp_path, "fade")
    q = pd.DataFrame(
        {
            "layer": [0, 1, 0, 1],
            "fvu": [0.1, 0.2, 0.11, 0.19],
            "l0": [3, 4, 3, 4],
            "source": ["build", "build", "recomputed", "recomputed"],
        }
    )
    plots.plot_world_quality(q, tmp_path, "world")
    _files(tmp_path, "world")
    plots.plot_circuit_features(_selections(), tmp_path, "feats")
    _files(tmp_path, "feats")


def test_world_compare_with_summary_and_quality_long():
    summary = {"ioi_acc": 1.0, "docstring_acc": 0.5, "fvu": [0.1, 0.3], "l0": [4.0, 2.0]}
    acc = pd.DataFrame([{"task": "ioi", "top1": 0.98}, {"task": "docstring", "top1": 0.5}])
    q = pd.DataFrame({"layer": [0, 1], "fvu": [0.1, 0.2], "l0": [4.0, 3.0]})
    c = world.compare_with_summary(summary, acc, q).set_index("quantity")
    assert c.loc["IOI accuracy (top-1)"].tolist() == [1.0, 0.98]
    assert c.loc["FVU mean over layers", "build"] == pytest.approx(0.2)
    assert c.loc["L0 layer 1", "recomputed"] == 3.0
    assert np.isnan(world.compare_with_summary(None, acc, q).set_index("quantity").loc["L0 layer 0", "build"])
    long = world.quality_long(summary, q)
    assert long["source"].tolist() == ["build", "build", "recomputed", "recomputed"]


def test_world_card_and_clt_quality_on_a_tiny_world(llama_world):
    card = world.world_card(llama_world.model, llama_world.clt).set_index("quantity")["value"]
    assert card["layers"] == str(llama_world.model.n_layers) and card["CLT activation"] == "JumpReLU"
    texts = [" ".join(p.text_clean.split()[:5]) for p in llama_world.pairs]
    q = world.clt_quality(llama_world.model, llama_world.clt, texts, batch_size=3)
    assert list(q["layer"]) == list(range(llama_world.model.n_layers))
    assert (q["fvu"] >= 0).all() and (q["l0"] > 0).all() and q["n_tokens"].iloc[0] == len(texts) * 5


# --------------------------------------------------------------------------- runs / notebook plumbing
def test_run_folders_and_figure_names():
    assert runs.slug("toy") == "toy" and runs.slug("toy:gpt2") == "toy-gpt2"
    assert runs.slug("meta-llama/Llama-3.2-1B") == "Llama-3.2-1B" and runs.slug("/x/my model/") == "my-model"
    assert runs.run_dir("runs/paper", "01_prune", "toy", "ioi").as_posix() == "runs/paper/toy/01_prune/ioi"
    assert runs.fig_name("kl", "toy") == "kl" and runs.fig_name("kl", "meta-llama/Llama-3.2-1B") == "kl__Llama-3.2-1B"
    assert runs.toy_arch("toy") == "llama" and runs.toy_arch("x/y") is None
    assert runs.toy_world_missing("some/model", "some/clt") is None
    assert runs.toy_summary_or_none("some/model") is None


def test_prune_config_maps_notebook_parameters():
    cfg = runs.prune_config(
        model="m",
        clt="c",
        task="docstring",
        methods=["fap"],
        k=[50],
        k_frac=[0.1],
        seeds=[1],
        n=4,
        out="o",
        lam=5,
        bp=50,
        extra={"ep_steps": 3},
        chunk=256,
    )
    assert cfg.params.synergy.lam == 5.0 and cfg.params.synergy.boundary_percent == 50.0
    assert cfg.params.extra == {"ep_steps": 3} and cfg.scoring.chunk == 256 and cfg.progress is False
    default = runs.prune_config()
    assert default.params.synergy.lam == 3.0 and default.params.synergy.boundary_percent == 25.0
    assert "chunk" not in json.dumps(cfg.identity(), default=str)  # speed knob, not identity


def test_select_rows_keeps_one_ladder(df):
    got = runs.select_rows(df, k=[50, 75], k_frac=[0.1], seeds=[1], methods=["fap"])
    assert set(zip(got.budget, got.k)) == {("abs", 50), ("abs", 75), ("frac", 0.1)}
    assert set(got.seed) == {1} and set(got.method) == {"fap"} and len(got) == 2 * 3 * 8
    assert len(runs.select_rows(df, k=[50], k_frac=[])) == len(df[(df.budget == "abs") & (df.k == 50)])


def test_filter_and_write_selections(tmp_path):
    recs = _selections()
    got = query_selections(recs, methods=["fap-synergy"], ks=[50, 75], prompts=range(1), budget="abs")
    assert [(r["method"], r["k"]) for r in got] == [("fap-synergy", 50), ("fap-synergy", 75)]
    assert len(query_selections(recs, seeds=[1], budget="abs")) == 0
    path = runs.write_selections(got, tmp_path / "s" / "selections.jsonl")
    from pie_lib.interpret.pipeline import read_selections

    assert read_selections(path) == got


class _FakeShell:
    def __init__(self):
        self.shown, self.custom, self.input_transformers_post = [], None, []

    def _showtraceback(self, etype, value, stb):
        self.shown.append(stb)

    def set_custom_exc(self, types, handler):
        self.custom = (types, handler)


def test_setup_makes_pie_errors_one_line(monkeypatch):
    shell = _FakeShell()
    monkeypatch.setattr(notebook, "_shell", lambda: shell)
    notebook.setup(seed=3, quiet=False)
    types, handler = shell.custom
    assert types == (PieError,)
    err = WeightsUnavailableError("model 'x/y': its config could not be read")
    handler(shell, type(err), err, None)
    assert shell.shown == [["WeightsUnavailableError: model 'x/y': its config could not be read"]]
    assert np.random.rand() == np.random.RandomState(3).rand()


def test_skip_notebook_turns_later_cells_into_no_ops(monkeypatch, capsys):
    shell = _FakeShell()
    monkeypatch.setattr(notebook, "_shell", lambda: shell)
    notebook.skip_notebook("the toy world is not built")
    assert "SKIPPED: the toy world is not built" in capsys.readouterr().out
    (noop,) = shell.input_transformers_post
    assert noop(["x = 1\n", "raise ValueError\n"]) == ["pass\n"]
    assert notebook.require("json") is True
    assert notebook.require("no_such_module_xyz", what="05") is False
    assert len(shell.input_transformers_post) == 2


def test_paper_cli_helpers():
    from pie_lib.experiments import paper

    assert paper.select(["02", "00_toy_world"]) == ["00_toy_world", "02_effective_budget"]
    assert paper.select(None) == list(paper.NOTEBOOKS)
    with pytest.raises(SystemExit, match="no notebook"):
        paper.select(["99"])
    assert paper.parse_params(["n=4", "model=meta-llama/Llama-3.2-1B", "seeds=[0, 1]", "remote=True"]) == {
        "n": 4,
        "model": "meta-llama/Llama-3.2-1B",
        "seeds": [0, 1],
        "remote": True,
    }


def test_paper_schedule_respects_dependencies_and_failures():
    from concurrent.futures import ThreadPoolExecutor

    from pie_lib.experiments import paper

    started, log = [], []

    def work(name):
        started.append(name)
        return name, 0.0, ("Boom: x" if name == "03_interpret" else None)

    with ThreadPoolExecutor(2) as pool:
        done, failed = paper.schedule(
            list(paper.NOTEBOOKS), lambda n: pool.submit(work, n), jobs=2, keep_going=True, log=log.append
        )
    assert started[0] == "01_prune" and set(started) == set(paper.NOTEBOOKS) - {"04_evaluate"}
    for name, deps in paper.DEPENDS.items():
        if name in started:
            assert all(started.index(d) < started.index(name) for d in deps)
    assert failed == {"03_interpret": "Boom: x", "04_evaluate": "not run: 03_interpret failed"}
    with ThreadPoolExecutor(1) as pool:
        _, failed = paper.schedule(
            ["01_prune", "02_effective_budget"],
            lambda n: pool.submit(lambda: (n, 0.0, "E: 1" if n == "01_prune" else None)),
            jobs=1,
            log=log.append,
        )
    assert failed == {"01_prune": "E: 1", "02_effective_budget": "not run: 01_prune failed"}
