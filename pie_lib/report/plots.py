"""The paper's figures, drawn from result tables only, saved as PNG and PDF.

Every function takes DataFrames (sweep rows of :func:`pie_lib.prune.sweep.run_prune`, or the
tables of :mod:`pie_lib.stats` / :mod:`pie_lib.report.tables`), draws one figure, writes
``<out_dir>/<name>.png`` and ``.pdf`` (no timestamps in the files, so reruns are byte-stable)
and returns the ``Figure``. Intervals are percentile-bootstrap CIs of the mean over the
(seed, prompt) units (:func:`pie_lib.stats.summarize`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import matplotlib
import matplotlib.pyplot as plt
import matplotlib.ticker
import numpy as np
import pandas as pd

from pie_lib.report.tables import FADE_METRICS, label

_PALETTE = {
    "fap": "#1f77b4",
    "fap-synergy": "#d62728",
    "clt-relp": "#2ca02c",
    "act-mag": "#9467bd",
    "act-mag-delta": "#8c564b",
    "random": "#7f7f7f",
    "fap-signal": "#ff7f0e",
    "factp": "#17becf",
    "acdc": "#bcbd22",
    "fap-full": "#aec7e8",
    "fap-per-layer": "#c5b0d5",
    "edge-pruning": "#e377c2",
    "edge-pruning-shared": "#f7b6d2",
    "hap": "#8c6d31",
    "ensemble-mean": "#393b79",
    "ensemble-min": "#637939",
    "ensemble-max": "#843c39",
    "ensemble-seq": "#7b4173",
}
METRIC_LABELS = {
    "kl": "last-token KL",
    "pred_change": "prediction change",
    "faithfulness": "faithfulness",
    "completeness": "completeness",
}
TASK_LABELS = {"ioi": "IOI", "docstring": "Doc-String"}


SHORT_LABELS = {
    "act-mag": "Act-Mag",
    "act-mag-delta": "Act-Mag Δ",
    "fap-synergy": "FAP-Syn.",
    "edge-pruning": "EdgePrune",
    "edge-pruning-shared": "EdgePrune-sh.",
}


def short_label(method: str) -> str:
    """A label short enough for a tick."""
    return SHORT_LABELS.get(method, label(method))


def color(method: str) -> str:
    """A fixed colour per method, so every figure agrees."""
    if method in _PALETTE:
        return _PALETTE[method]
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return cycle[sum(map(ord, method)) % len(cycle)]


def save_figure(fig: Any, name: str, out_dir: str | Path, dpi: int = 150) -> list[Path]:
    """Write ``<out_dir>/<name>.png`` and ``.pdf`` without timestamps; return the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    png, pdf = out / f"{name}.png", out / f"{name}.pdf"
    fig.savefig(png, dpi=dpi, bbox_inches="tight", metadata={"Software": None})
    fig.savefig(
        pdf, bbox_inches="tight", metadata={"CreationDate": None, "ModDate": None, "Producer": None, "Creator": None}
    )
    return [png, pdf]


def _methods(df: pd.DataFrame, methods: Sequence[str] | None) -> list[str]:
    from pie_lib.report.tables import _order

    present = df["method"].unique().tolist()
    return [m for m in (methods or _order(present, None)) if m in present]


def _summary(df: pd.DataFrame, by: Sequence[str], value: str, n_boot: int) -> pd.DataFrame:
    """Mean and CI per group; MIB faithfulness / completeness as ratios of means (their definition)."""
    from pie_lib.stats import mib_faithfulness, summarize

    if value in ("faithfulness", "completeness") and {"m_clean", "m_null"} <= set(df.columns):
        s = mib_faithfulness(df, by=by, which=value, n_boot=n_boot, seed=0)
        return s.rename(columns={value: "mean"})
    d = df.assign(**{value: df[value].astype(float)})
    return summarize(d, by=by, value=value, n_boot=n_boot, seed=0)


# --------------------------------------------------------------------------- metric vs K
def _ladder_axis(ax: Any, ks: Sequence[float], budget: str) -> None:
    """Log x axis with a tick at every ladder value ("50" or "5%")."""
    ax.set_xscale("log")
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    shown = ks if len(ks) <= 8 else ks[:: max(1, len(ks) // 8)]
    ax.set_xticks(shown, [f"{k:g}" if budget == "abs" else f"{100 * k:g}%" for k in shown], fontsize=8)


def plot_metric_vs_k(
    df: pd.DataFrame,
    out_dir: str | Path,
    name: str,
    metrics: Sequence[str] = ("kl",),
    budget: str = "abs",
    methods: Sequence[str] | None = None,
    tasks: Sequence[str] | None = None,
    n_boot: int = 1000,
    title: str | None = None,
) -> Any:
    """Grid of ``metric`` (rows) against budget K (log x axis) per task (columns), one line per
    method with its bootstrap CI band (over seeds and prompts).

    Args:
        df: sweep rows. metrics: columns to plot (kl, pred_change, faithfulness, completeness...).
        budget: "abs" (x = K) or "frac" (x = fraction of the active set).
        methods, tasks: subset and order (default: all present).
    """
    d = cast(pd.DataFrame, df[df["budget"] == budget])
    if d.empty:
        raise ValueError(f"no rows with budget={budget!r} to plot")
    tasks = [t for t in (tasks or sorted(d["task"].unique())) if t in set(d["task"])]
    methods = _methods(d, methods)
    fig, axes = plt.subplots(
        len(metrics), len(tasks), figsize=(4.2 * len(tasks), 3.0 * len(metrics)), squeeze=False, sharex=True
    )
    for j, task in enumerate(tasks):
        dt = cast(pd.DataFrame, d[d["task"] == task])
        for i, metric in enumerate(metrics):
            ax = axes[i][j]
            s = _summary(cast(pd.DataFrame, dt[dt["method"].isin(methods)]), ("method", "k"), metric, n_boot)
            for m in methods:
                sm = cast(pd.DataFrame, s[s["method"] == m]).sort_values("k")
                if sm.empty:
                    continue
                ax.plot(sm["k"], sm["mean"], marker="o", ms=3, lw=1.5, color=color(m), label=label(m))
                ax.fill_between(sm["k"], sm["ci_low"], sm["ci_high"], color=color(m), alpha=0.15, lw=0)
            _ladder_axis(ax, sorted(dt["k"].unique()), budget)
            if i == 0:
                ax.set_title(TASK_LABELS.get(task, task))
            if j == 0:
                ax.set_ylabel(METRIC_LABELS.get(metric, metric))
            if i == len(metrics) - 1:
                ax.set_xlabel("K (occurrences per prompt)" if budget == "abs" else "K (fraction of active set)")
            ax.grid(alpha=0.3, lw=0.5)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=min(len(labels), 6), frameon=False, bbox_to_anchor=(0.5, 0.0))
    save_figure(fig, name, out_dir)
    return fig


# --------------------------------------------------------------------------- effective budget
def plot_effective_budget(
    df: pd.DataFrame,
    out_dir: str | Path,
    name: str,
    reference: str = "fap-synergy",
    k_ref: int = 50,
    k_cmp: int = 75,
    baselines: Sequence[str] = ("fap", "clt-relp"),
    eb_table: pd.DataFrame | None = None,
    value: str = "kl",
    n_boot: int = 2000,
) -> Any:
    """The Effective-Budget figure.

    Left: mean ``value`` of the reference at ``k_ref`` and of each baseline at ``k_ref`` and
    ``k_cmp`` with 95% bootstrap CIs over (seed, prompt) units; small markers are the per-seed
    means. Right: each baseline's mean curve over the ladder, the reference level at ``k_ref``
    (with its CI band) and, from ``eb_table`` (:func:`pie_lib.stats.effective_budget_table`),
    the crossing K_eff with its CI.
    """
    d = cast(pd.DataFrame, df[(df["budget"] == "abs")]) if "budget" in df.columns else df
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 3.8), gridspec_kw={"width_ratios": [1, 1.3]})
    s = _summary(cast(pd.DataFrame, d[d["method"].isin([reference, *baselines])]), ("method", "k"), value, n_boot)
    cells = [(reference, k_ref)] + [(b, k) for b in baselines for k in (k_ref, k_cmp)]
    x = np.arange(len(cells))
    for i, (m, k) in enumerate(cells):
        r = s[(s["method"] == m) & (s["k"] == k)]
        if r.empty:
            continue
        r = r.iloc[0]
        ax.errorbar(
            i,
            r["mean"],
            yerr=[[r["mean"] - r["ci_low"]], [r["ci_high"] - r["mean"]]],
            fmt="o",
            capsize=4,
            color=color(m),
            mfc="white" if k != k_cmp and m != reference else color(m),
            ms=7,
        )
        seed_cols = [c for c in s.columns if c.startswith("mean_seed_")]
        sv = r[seed_cols].astype(float).dropna().to_numpy()
        ax.scatter(np.full(sv.size, i + 0.18), sv, s=10, color=color(m), alpha=0.6, marker="_")
    ref = cast(pd.DataFrame, s[(s["method"] == reference) & (s["k"] == k_ref)])
    if len(ref):
        ax.axhline(float(ref["mean"].iloc[0]), color=color(reference), ls="--", lw=1, alpha=0.7)
    ax.set_xticks(x, [f"{short_label(m)}\nK={k}" for m, k in cells], fontsize=8, rotation=30, ha="right")
    ax.set_ylabel(METRIC_LABELS.get(value, value))
    ax.set_title(f"{label(reference)} at K={k_ref} vs baselines at K={k_cmp}", fontsize=10)
    ax.grid(alpha=0.3, axis="y", lw=0.5)

    sc = _summary(cast(pd.DataFrame, d[d["method"].isin(baselines)]), ("method", "k"), value, n_boot)
    for b in baselines:
        sb = cast(pd.DataFrame, sc[sc["method"] == b]).sort_values("k")
        ax2.plot(sb["k"], sb["mean"], marker="o", ms=3, color=color(b), label=label(b))
        ax2.fill_between(sb["k"], sb["ci_low"], sb["ci_high"], color=color(b), alpha=0.12, lw=0)
        if eb_table is not None and b in set(eb_table["baseline"]):
            e = eb_table[eb_table["baseline"] == b].iloc[0]
            if np.isfinite(e["k_eff"]):
                ax2.axvline(e["k_eff"], color=color(b), ls=":", lw=1)
                lo = e["k_eff_ci_low"] if np.isfinite(e["k_eff_ci_low"]) else sb["k"].min()
                hi = e["k_eff_ci_high"] if np.isfinite(e["k_eff_ci_high"]) else sb["k"].max()
                ax2.axvspan(lo, hi, color=color(b), alpha=0.07, lw=0)
    if len(ref):
        r = ref.iloc[0]
        ax2.axhline(r["mean"], color=color(reference), ls="--", lw=1.2, label=f"{label(reference)} K={k_ref}")
        ax2.axhspan(r["ci_low"], r["ci_high"], color=color(reference), alpha=0.08, lw=0)
    ax2.axvline(k_cmp, color="k", lw=0.6, alpha=0.4)
    _ladder_axis(ax2, sorted(sc["k"].unique()), "abs")
    ax2.set_xlabel("K (occurrences per prompt)")
    ax2.set_ylabel(METRIC_LABELS.get(value, value))
    ax2.set_title("Effective budget K_eff (dotted) with 95% CI", fontsize=10)
    ax2.legend(fontsize=8, frameon=False)
    ax2.grid(alpha=0.3, which="both", lw=0.5)
    fig.tight_layout()
    save_figure(fig, name, out_dir)
    return fig


def plot_seed_ablation(ablation: pd.DataFrame, out_dir: str | Path, name: str) -> Any:
    """Matched-seed ablation (:func:`pie_lib.stats.matched_seed_ablation`): the pooled mean
    difference ablated − full per K with its bootstrap CI, and each seed's mean difference."""
    a = ablation.attrs
    pooled = cast(pd.DataFrame, ablation[ablation["scope"] == "pooled"]).sort_values("k")
    seeds = ablation[ablation["scope"] == "seed"]
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    ks = pooled["k"].to_numpy()
    xs = np.arange(len(ks))
    ax.errorbar(
        xs,
        pooled["mean_diff"],
        yerr=[pooled["mean_diff"] - pooled["ci_low"], pooled["ci_high"] - pooled["mean_diff"]],
        fmt="o",
        capsize=4,
        color="k",
        label="pooled (95% CI)",
    )
    for s, g in seeds.groupby("seed"):
        pos = [int(np.where(ks == k)[0][0]) for k in g["k"]]
        ax.scatter(np.array(pos) + 0.15, g["mean_diff"], s=14, alpha=0.7, label=f"seed {s}")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xticks(xs, [f"{k:g}" for k in ks])
    ax.set_xlabel("K")
    ax.set_ylabel(
        f"{METRIC_LABELS.get(a.get('value', 'kl'), 'value')}: "
        f"{label(a.get('ablated', 'fap'))} − {label(a.get('full', 'fap-synergy'))}"
    )
    ax.set_title("Reranking ablation under matched seeds (> 0: reranking helps)", fontsize=10)
    ax.legend(fontsize=7, frameon=False, ncol=2)
    ax.grid(alpha=0.3, axis="y", lw=0.5)
    fig.tight_layout()
    save_figure(fig, name, out_dir)
    return fig


# --------------------------------------------------------------------------- related methods
def plot_cpr_cmd(cpr: pd.DataFrame, out_dir: str | Path, name: str, runtime: pd.DataFrame | None = None) -> Any:
    """Bars of CPR (higher better) and CMD (lower better) per method ± std over prompt curves,
    and seconds per prompt when ``runtime`` (``method, seconds_per_prompt``) is given."""
    methods = _methods(cpr, None)
    c = cpr.set_index("method").loc[methods]
    n = 3 if runtime is not None and len(runtime) else 2
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 0.35 * len(methods) + 1.6), sharey=True)
    y = np.arange(len(methods))
    cols = [color(m) for m in methods]
    for ax, key, title in ((axes[0], "cpr", "CPR ↑"), (axes[1], "cmd", "CMD ↓")):
        if f"{key}_ci_low" in c.columns:  # pie_lib.stats.mib_cpr_cmd: areas of the aggregate curve with CIs
            lo, hi = (c[key] - c[f"{key}_ci_low"]).clip(lower=0), (c[f"{key}_ci_high"] - c[key]).clip(lower=0)
            err = np.vstack([lo.fillna(0).to_numpy(), hi.fillna(0).to_numpy()])
        else:
            err = c[f"{key}_std"].fillna(0).to_numpy()
        ax.barh(y, c[key], xerr=err, color=cols, alpha=0.85, capsize=2)
        ax.set_title(title)
        ax.grid(alpha=0.3, axis="x", lw=0.5)
    if runtime is not None and n == 3:
        rt = cast(pd.Series, runtime.groupby("method")["seconds_per_prompt"].mean()).reindex(methods)
        axes[2].barh(y, rt.to_numpy(), color=cols, alpha=0.85)
        axes[2].set_xscale("log")
        axes[2].set_title("seconds / prompt (K=50)")
        axes[2].grid(alpha=0.3, axis="x", lw=0.5)
    axes[0].set_yticks(y, [label(m) for m in methods], fontsize=8)
    axes[0].invert_yaxis()
    fig.tight_layout()
    save_figure(fig, name, out_dir)
    return fig


def plot_faithfulness_curves(curve: pd.DataFrame, out_dir: str | Path, name: str) -> Any:
    """Faithfulness against circuit size fraction per method.

    Args:
        curve: the ``curve`` of :func:`pie_lib.stats.mib_cpr_cmd` (MIB's ratio of means per
            fraction, with its CI band), or ``pie_lib.prune.related.mib.faithfulness_curve`` rows --
            with ``by_prompt=True`` (one row per prompt: the median over prompts and its
            interquartile band) or the default means of per-prompt ratios.
    """
    per_prompt = "prompt_idx" in curve.columns
    aggregate = "ci_low" in curve.columns  # pie_lib.stats.mib_cpr_cmd's ratio-of-means curve with its CI
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for m in _methods(curve, None):
        c = cast(pd.DataFrame, curve[curve["method"] == m])
        if aggregate:
            c = cast(pd.DataFrame, c[c["size_frac"] > 0]).rename(columns={"ci_low": "lo", "ci_high": "hi"})
        if per_prompt:
            g = c.groupby(["budget", "k"])
            c = pd.DataFrame(
                {
                    "size_frac": g["size_frac"].median(),
                    "faithfulness": g["faithfulness"].median(),
                    "lo": g["faithfulness"].quantile(0.25),
                    "hi": g["faithfulness"].quantile(0.75),
                }
            )
        c = c.sort_values("size_frac")
        ax.plot(c["size_frac"], c["faithfulness"], marker="o", ms=3, color=color(m), label=label(m))
        if per_prompt or aggregate:
            ax.fill_between(c["size_frac"], c["lo"], c["hi"], color=color(m), alpha=0.08, lw=0)
    ax.axhline(1, color="grey", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{100 * v:g}%"))
    ax.set_xlabel("circuit size (fraction of active occurrences)")
    ax.set_ylabel(
        "faithfulness"
        + (" (ratio of means, 95% CI)" if aggregate else " (median, IQR)" if per_prompt else " (mean of ratios)")
    )
    ax.legend(fontsize=7, frameon=False, loc="center left", bbox_to_anchor=(1.0, 0.5))
    ax.grid(alpha=0.3, which="major", lw=0.5)
    fig.tight_layout()
    save_figure(fig, name, out_dir)
    return fig


# --------------------------------------------------------------------------- sensitivity
def plot_sensitivity(table: pd.DataFrame, out_dir: str | Path, name: str, value_label: str = "mean KL") -> Any:
    """Heatmaps of FAP-Synergy's mean KL over λ (rows) × boundary percent (columns), one per K;
    cell text is the difference to plain FAP at that K when the table has it
    (:func:`pie_lib.report.tables.sensitivity_table`)."""
    ks = sorted(table["k"].unique())
    fig, axes = plt.subplots(1, len(ks), figsize=(3.6 * len(ks), 3.2), squeeze=False)
    for ax, k in zip(axes[0], ks):
        t = table[table["k"] == k]
        grid = t.pivot_table(index="lam", columns="bp", values="mean")
        im = ax.imshow(grid.to_numpy(), cmap="viridis_r", aspect="auto")
        ax.set_xticks(range(grid.shape[1]), [f"{c:g}" for c in grid.columns])
        ax.set_yticks(range(grid.shape[0]), [f"{r:g}" for r in grid.index])
        ax.set_xlabel("boundary percent")
        ax.set_ylabel("λ")
        ax.set_title(f"K={k:g}", fontsize=10)
        diff = t.pivot_table(index="lam", columns="bp", values="diff") if "diff" in t.columns else None
        for i in range(grid.shape[0]):
            for j in range(grid.shape[1]):
                v = grid.iat[i, j]
                if np.isnan(v):
                    continue
                txt = f"{v:.3f}" if diff is None else f"{v:.3f}\n({diff.iat[i, j]:+.3f})"
                light = im.norm(v) < 0.5  # viridis_r is light (yellow) at low values
                ax.text(j, i, txt, ha="center", va="center", fontsize=7, color="k" if light else "w")
        fig.colorbar(im, ax=ax, shrink=0.8, label=value_label)
    fig.suptitle("FAP-Synergy sensitivity (in brackets: difference to FAP)", fontsize=10)
    fig.tight_layout()
    save_figure(fig, name, out_dir)
    return fig


# --------------------------------------------------------------------------- FADE
def plot_fade(by_method: pd.DataFrame, out_dir: str | Path, name: str) -> Any:
    """Grouped bars of the FADE metrics per method (:func:`pie_lib.report.tables.fade_by_method`)."""
    methods = by_method["method"].tolist()
    fig, ax = plt.subplots(figsize=(1.6 + 1.5 * len(FADE_METRICS), 3.4))
    w = 0.8 / max(1, len(methods))
    x = np.arange(len(FADE_METRICS))
    for i, m in enumerate(methods):
        r = by_method[by_method["method"] == m].iloc[0]
        means = [r[f"{k}_mean"] for k in FADE_METRICS]
        stds = [0 if pd.isna(r[f"{k}_std"]) else r[f"{k}_std"] for k in FADE_METRICS]
        ax.bar(
            x + (i - (len(methods) - 1) / 2) * w,
            np.nan_to_num(means),
            w,
            yerr=stds,
            capsize=2,
            color=color(m),
            label=f"{label(m)} ({int(r['n_scored'])} features)",
            alpha=0.85,
        )
    ax.set_xticks(x, [k.capitalize() for k in FADE_METRICS])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("score (mean ± std over features)")
    ax.legend(fontsize=7, frameon=False, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=min(len(methods), 4))
    ax.grid(alpha=0.3, axis="y", lw=0.5)
    fig.tight_layout()
    save_figure(fig, name, out_dir)
    return fig


# --------------------------------------------------------------------------- interpret
def plot_circuit_features(selections: Sequence[dict], out_dir: str | Path, name: str) -> Any:
    """Distinct features per circuit (mean over circuits) and distinct features over all circuits,
    per method and budget -- what interpretation has to explain."""
    rows = []
    for r in selections:
        rows.append(
            {
                "method": r["method"],
                "k": float(r["k"]),
                "prompt": (r["seed"], r["prompt_idx"]),
                "feats": {(int(l), int(f)) for l, _p, f in r["occurrences"]},
            }
        )
    d = pd.DataFrame(rows)
    methods = _methods(d, None)
    ks = sorted(d["k"].unique())
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    w = 0.8 / max(1, len(ks))
    x = np.arange(len(methods))
    for i, k in enumerate(ks):
        per, union = [], []
        for m in methods:
            g = d[(d["method"] == m) & (d["k"] == k)]
            per.append(np.mean([len(f) for f in g["feats"]]) if len(g) else np.nan)
            union.append(len(set().union(*g["feats"])) if len(g) else np.nan)
        off = (i - (len(ks) - 1) / 2) * w
        axes[0].bar(x + off, per, w, label=f"K={k:g}", alpha=0.85)
        axes[1].bar(x + off, union, w, label=f"K={k:g}", alpha=0.85)
    for ax, t in zip(axes, ("distinct features per circuit", "distinct features, all circuits")):
        ax.set_xticks(x, [label(m) for m in methods], fontsize=8, rotation=15)
        ax.set_title(t, fontsize=10)
        ax.legend(fontsize=7, frameon=False)
        ax.grid(alpha=0.3, axis="y", lw=0.5)
    fig.tight_layout()
    save_figure(fig, name, out_dir)
    return fig


# --------------------------------------------------------------------------- toy world
def plot_world_quality(quality: pd.DataFrame, out_dir: str | Path, name: str) -> Any:
    """Per-layer FVU and L0 of the CLT (:func:`pie_lib.experiments.world.clt_quality` rows
    ``layer, fvu, l0`` with an optional ``source`` column: "summary" / "recomputed")."""
    q = quality if "source" in quality.columns else quality.assign(source="recomputed")
    fig, axes = plt.subplots(1, 2, figsize=(8, 3))
    sources = list(dict.fromkeys(q["source"]))
    w = 0.8 / len(sources)
    for i, src in enumerate(sources):
        s = cast(pd.DataFrame, q[q["source"] == src]).sort_values("layer")
        for ax, key in zip(axes, ("fvu", "l0")):
            ax.bar(s["layer"].to_numpy() + (i - (len(sources) - 1) / 2) * w, s[key], w, label=src, alpha=0.85)
    axes[0].set_title("CLT FVU per layer (lower better)", fontsize=10)
    axes[1].set_title("CLT L0 per layer (active features / token)", fontsize=10)
    for ax in axes:
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3, axis="y", lw=0.5)
        ax.legend(fontsize=7, frameon=False)
    fig.tight_layout()
    save_figure(fig, name, out_dir)
    return fig


__all__ = [
    "METRIC_LABELS",
    "color",
    "plot_circuit_features",
    "plot_cpr_cmd",
    "plot_effective_budget",
    "plot_fade",
    "plot_faithfulness_curves",
    "plot_metric_vs_k",
    "plot_seed_ablation",
    "plot_sensitivity",
    "plot_world_quality",
    "save_figure",
]
