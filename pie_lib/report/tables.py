"""The paper's tables, built from results tables and written as CSV + Markdown + LaTeX.

Every builder takes result DataFrames (one row per method, K, seed, prompt -- the rows of
:func:`pie_lib.prune.sweep.run_prune` -- or the per-feature FADE rows) and returns a DataFrame;
:func:`write_table` writes it to ``<out>/<name>.{csv,md,tex}``. Numbers are never typed in here:
the paper's reported values come from :mod:`pie_lib.report.paper_numbers`.

Builders:

- :func:`kl_summary` / :func:`format_kl_table` -- last-token KL mean ± std at K = 50/100/200 per
  method (spec §9, first table).
- :func:`effective_budget_means` -- the paper's Effective-Budget line: reference at K=50 against
  baselines at K=75.
- :func:`format_ablation_table` -- matched-seed ablation FAP vs FAP-Synergy per K.
- :func:`fade_by_method` / :func:`format_fade_table` -- FADE scores of the features each method
  keeps at one budget (spec §9, FADE at K=50 on Doc-String).
- :func:`paper_comparison` -- our numbers next to the paper's.
- :func:`cpr_cmd_runtime_table`, :func:`sensitivity_table`, :func:`toy_world_table`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd

from pie_lib.report import paper_numbers as paper
from pie_lib.selections import query_selections

FADE_METRICS = ("clarity", "purity", "responsiveness", "faithfulness")


# --------------------------------------------------------------------------- helpers
def label(method: str) -> str:
    """The paper's name of a registry method (``fap-synergy`` -> ``FAP-Synergy``)."""
    return paper.METHOD_LABELS.get(method, method)


def pm(mean: float, std: float, digits: int = 2) -> str:
    """``"1.22±0.56"``; ``"–"`` for a missing mean, the mean alone for a missing std."""
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    if std is None or (isinstance(std, float) and math.isnan(std)):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f}±{std:.{digits}f}"


def _rows(df: pd.DataFrame) -> Iterator[Mapping[str, Any]]:
    """``df.iterrows()`` rows as column -> cell mappings (pandas leaves ``Series.__getitem__``
    unannotated, so a cell would otherwise type as a union of containers)."""
    for _, r in df.iterrows():
        yield cast("Mapping[str, Any]", r)


def _order(methods: Iterable[str], preferred: Sequence[str] | None) -> list[str]:
    present = list(dict.fromkeys(methods))
    if preferred is None:
        preferred = list(paper.METHOD_LABELS)
    return [m for m in preferred if m in present] + sorted(m for m in present if m not in preferred)


def write_table(
    table: pd.DataFrame,
    name: str,
    out_dir: str | Path,
    caption: str | None = None,
    data: pd.DataFrame | None = None,
    floatfmt: str = ".3g",
) -> dict[str, Path]:
    """Write ``<out_dir>/<name>.csv`` (``data`` if given, else ``table``), ``.md`` and ``.tex``.

    Args:
        table: what the reader sees (Markdown and LaTeX).
        name: file stem. out_dir: folder (created).
        caption: LaTeX caption and a Markdown line above the table.
        data: the numeric table behind ``table`` for the CSV (default ``table`` itself).
        floatfmt: format of float cells in Markdown / LaTeX.
    Returns:
        ``{"csv": path, "md": path, "tex": path}``.
    """
    from pie_lib.stats import to_latex, to_markdown

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / f"{name}.csv", "md": out / f"{name}.md", "tex": out / f"{name}.tex"}
    (data if data is not None else table).to_csv(paths["csv"], index=False, float_format="%.6g")
    md = to_markdown(table, floatfmt=floatfmt)
    paths["md"].write_text((f"**{caption}**\n\n" if caption else "") + md, encoding="utf-8")
    paths["tex"].write_text(to_latex(table, floatfmt=floatfmt, caption=caption, label=f"tab:{name}"), encoding="utf-8")
    return paths


# --------------------------------------------------------------------------- KL at K
def kl_summary(
    df: pd.DataFrame,
    ks: Sequence[float] = (50, 100, 200),
    methods: Sequence[str] | None = None,
    value: str = "kl",
    budget: str = "abs",
) -> pd.DataFrame:
    """Mean ± std over prompts of ``value`` per (task, method, K), the prompt as unit.

    Seeds that share a prompt are averaged within it first (:mod:`pie_lib.stats.design`), so
    ``std`` is the spread over prompts and ``n`` counts prompts, not prompt copies.

    Args:
        df: sweep rows. ks: budgets. methods: order and subset (default: all, paper order).
        value: column. budget: "abs" (K occurrences) or "frac" (K = fraction of the active set).
    Returns:
        ``task, method, k, n, n_prompts, n_seeds, unit, mean, std, seed_sd, clipped`` where
        ``clipped`` is the fraction of rows whose budget exceeded the prompt's active set
        (k_eff < k) and ``seed_sd`` the seed component (:func:`pie_lib.stats.design.seed_spread`).
    """
    from pie_lib.stats import summarize

    d = cast(pd.DataFrame, df[(df["budget"] == budget) & df["k"].isin(list(ks))])
    if methods is not None:
        d = cast(pd.DataFrame, d[d["method"].isin(list(methods))])
    if "task" not in d.columns:
        d = d.assign(task="?")
    x = d.assign(_v=d[value].astype(float), _clip=(d["k_eff"] < d["k"]) if budget == "abs" else False)
    by = ["task", "method", "k"]
    s = summarize(x, by=by, value="_v", n_boot=0)[[*by, "n", "n_prompts", "n_seeds", "unit", "mean", "std", "seed_sd"]]
    out = s.merge(cast(pd.Series, x.groupby(by)["_clip"].mean()).rename("clipped").reset_index(), on=by)
    order = _order(out["method"], methods)
    out["_m"] = out["method"].map({m: i for i, m in enumerate(order)})
    return out.sort_values(["task", "_m", "k"]).drop(columns="_m").reset_index(drop=True)


def format_kl_table(summary: pd.DataFrame, model: str = "toy", digits: int = 2) -> pd.DataFrame:
    """The paper's KL table layout: ``Model, Task, Method, K=50, K=100, K=200`` of "mean±std".

    A budget clipped to the active set on some prompts is marked ``*``.
    """
    ks = sorted(summary["k"].unique())
    rows = []
    for key, g in summary.groupby(["task", "method"], sort=False):
        task, method = cast(tuple[str, str], key)
        row: dict[str, Any] = {"Model": model, "Task": task, "Method": label(method)}
        cells = g.set_index("k")
        for k in ks:
            if k in cells.index:
                r = cells.loc[k]
                row[f"K={k:g}"] = pm(r["mean"], r["std"], digits) + ("*" if r["clipped"] > 0 else "")
            else:
                row[f"K={k:g}"] = "–"
        rows.append(row)
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- effective budget
def effective_budget_means(
    df: pd.DataFrame,
    reference: str = "fap-synergy",
    k_ref: int = 50,
    k_cmp: int = 75,
    baselines: Sequence[str] = ("fap", "clt-relp"),
    value: str = "kl",
    model: str = "toy",
    digits: int = 2,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The paper's Effective-Budget line: mean ``value`` of the reference at ``k_ref`` and of
    each baseline at ``k_cmp``, over prompts (seeds sharing a prompt averaged within it).

    Returns:
        (formatted one-row table ``Model, <Ref> K=50, <Base> K=75, ..., Prompts × seeds`` of
        "mean±std", numeric tidy table ``model, method, k, n, n_prompts, n_seeds, unit, mean,
        std, seed_sd, seed_std``) -- ``std`` is the spread over prompts, ``seed_sd`` the seed
        component, ``seed_std`` the spread of the per-seed means.
    """
    from pie_lib.stats import summarize

    d = cast(pd.DataFrame, df[df["budget"] == "abs"]) if "budget" in df.columns else df
    cells = [(reference, k_ref)] + [(b, k_cmp) for b in baselines]
    rows, fmt = [], {"Model": model}
    for m, k in cells:
        x = cast(pd.DataFrame, d[(d["method"] == m) & (d["k"] == k)])
        if x.empty:
            rows.append(
                {
                    "model": model,
                    "method": m,
                    "k": k,
                    "n": 0,
                    "n_prompts": 0,
                    "n_seeds": 0,
                    "unit": "",
                    "mean": np.nan,
                    "std": np.nan,
                    "seed_sd": np.nan,
                    "seed_std": np.nan,
                }
            )
        else:
            s = summarize(x.assign(_v=x[value].astype(float)), value="_v", n_boot=0).iloc[0]
            rows.append(
                {
                    "model": model,
                    "method": m,
                    "k": k,
                    **{c: s[c] for c in ("n", "n_prompts", "n_seeds", "unit", "mean", "std", "seed_sd", "seed_std")},
                }
            )
        fmt[f"{label(m)} K={k}"] = pm(rows[-1]["mean"], rows[-1]["std"], digits)
    first = rows[0]
    fmt["Prompts × seeds"] = f"{first['n_prompts']} × {first['n_seeds']} ({first['unit']})"
    return pd.DataFrame([fmt]), pd.DataFrame(rows)


def format_ablation_table(ablation: pd.DataFrame, digits: int = 3) -> pd.DataFrame:
    """Human-readable :func:`pie_lib.stats.matched_seed_ablation` (pooled rows, then per seed).

    Columns: ``K, Scope, Prompts × seeds, <ablated>, <full>, Δ (ablated − full) [CI], p (t),
    p (Wilcoxon), Seed sd of Δ, p (seeds)``; Δ > 0 on KL means the reranking lowers KL. ``p (seeds)``
    is shown only for seed-specific prompts (NaN "–" when seeds share prompts, see
    :func:`pie_lib.stats.matched_seed_ablation`).
    """
    a = ablation.attrs
    full, abl = label(a.get("full", "full")), label(a.get("ablated", "ablated"))
    lvl = f"{100 * a.get('level', 0.95):.0f}%"

    def p(x: Any) -> str:
        return "–" if x is None or pd.isna(x) else ("< 0.001" if x < 0.001 else f"{x:.3f}")

    rows = []
    d = ablation.assign(_pooled=ablation["scope"] != "pooled").sort_values(
        ["k", "_pooled", "seed"], na_position="first"
    )
    for r in _rows(d):
        rows.append(
            {
                "K": int(r["k"]),
                "Scope": "pooled" if r["scope"] == "pooled" else f"seed {int(r['seed'])}",
                "Prompts × seeds": f"{int(r['n_prompts'])} × {int(r['n_seeds'])}"
                if "n_prompts" in r
                else str(int(r["n"])),
                abl: f"{r['mean_ablated']:.{digits}f}",
                full: f"{r['mean_full']:.{digits}f}",
                f"Δ [{lvl} CI]": f"{r['mean_diff']:+.{digits}f} [{r['ci_low']:+.{digits}f}, {r['ci_high']:+.{digits}f}]",
                "p (t)": p(r["p_t"]),
                "p (Wilcoxon)": p(r["p_wilcoxon"]),
                "Seed sd of Δ": f"{r['seed_sd_diff']:.{digits}f}"
                if r["scope"] == "pooled" and bool(pd.notna(r.get("seed_sd_diff")))
                else "",
                "p (seeds)": p(r.get("p_seed_t")) if r["scope"] == "pooled" else "",
            }
        )
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- FADE
def circuit_features(
    selections: Sequence[dict],
    method: str,
    k: float,
    seeds: Sequence[int] | None = None,
    prompts: Sequence[int] | None = None,
) -> set[tuple[int, int]]:
    """The union of kept (layer, feature) pairs of ``method`` at budget ``k`` over the circuits."""
    out: set[tuple[int, int]] = set()
    for r in query_selections(selections, methods=method, ks=k, seeds=seeds, prompts=prompts):
        out.update((int(l), int(f)) for l, _p, f in r["occurrences"])
    return out


_STATUS_OF = {
    "clarity": "clarity_status",
    "responsiveness": "responsiveness_status",
    "purity": "responsiveness_status",
    "faithfulness": "faithfulness_status",
}


def fade_by_method(
    fade: pd.DataFrame,
    selections: Sequence[dict],
    k: float = 50,
    methods: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
    prompts: Sequence[int] | None = None,
) -> pd.DataFrame:
    """FADE scores of the features each method keeps at budget ``k`` (each distinct feature once).

    Args:
        fade: per-feature rows of :func:`pie_lib.evaluate.evaluate` (``layer, feature, clarity,
            responsiveness, purity, faithfulness``). selections: records of ``load_selections``.
        k: the budget. methods: order and subset (default: all in the selections).
        seeds, prompts: restrict the circuits.
    Returns:
        ``method, k, n_features, n_scored, <metric>_mean, <metric>_std, <metric>_n,
        <metric>_undefined, <metric>_why`` for clarity, purity, responsiveness, faithfulness:
        ``_n`` features with a defined score, ``_undefined`` the others among the scored, ``_why``
        their reasons with counts (from the ``*_status`` columns of the evaluation; purity shares
        responsiveness's).
    """
    methods = _order({r["method"] for r in selections}, None) if methods is None else list(methods)
    scores = fade.set_index(["layer", "feature"])
    rows = []
    for m in methods:
        feats = circuit_features(selections, m, k, seeds, prompts)
        sub = scores.loc[scores.index.isin(list(feats))]
        row: dict[str, Any] = {"method": m, "k": k, "n_features": len(feats), "n_scored": len(sub)}
        for metric in FADE_METRICS:
            v = cast(pd.Series, sub[metric]).astype(float) if metric in sub.columns else pd.Series(dtype=float)
            row[f"{metric}_mean"] = float(v.mean()) if v.notna().any() else np.nan
            row[f"{metric}_std"] = float(cast(float, v.std(ddof=1))) if v.notna().sum() > 1 else np.nan
            row[f"{metric}_n"] = int(v.notna().sum())
            row[f"{metric}_undefined"] = int(v.isna().sum())
            status_col = _STATUS_OF.get(metric)
            if status_col in sub.columns:
                why = sub.loc[v.isna().to_numpy(), status_col].fillna("unknown").value_counts()
                row[f"{metric}_why"] = "; ".join(f"{reason}: {count}" for reason, count in why.items())
            else:
                row[f"{metric}_why"] = "" if not v.isna().any() else "reason not recorded"
        rows.append(row)
    return pd.DataFrame(rows)


def format_fade_table(by_method: pd.DataFrame, model: str = "toy", digits: int = 3) -> pd.DataFrame:
    """``Model, Method, Features, Clarity, Purity, Responsiveness, Faithfulness, Undefined``:
    mean±std (n = features with a defined score) per metric, and why the others are undefined."""
    rows = []
    for r in _rows(by_method):
        row = {"Model": model, "Method": label(r["method"]), "Features": f"{int(r['n_scored'])}/{int(r['n_features'])}"}
        why = []
        for metric in FADE_METRICS:
            cell = pm(r[f"{metric}_mean"], r[f"{metric}_std"], digits)
            if f"{metric}_n" in r:
                cell += f" (n={int(r[f'{metric}_n'])})"
                if r.get(f"{metric}_undefined", 0):
                    why.append(f"{metric}: {r[f'{metric}_why']}")
            row[metric.capitalize()] = cell
        row["Undefined"] = " | ".join(why) if why else "–"
        rows.append(row)
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- paper vs ours
def paper_comparison(
    kl: pd.DataFrame | None = None,
    eb: pd.DataFrame | None = None,
    fade: pd.DataFrame | None = None,
    ours: str = "toy",
    task: str = "ioi",
    digits: int = 2,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Our numbers next to the paper's (:mod:`pie_lib.report.paper_numbers`), row by row.

    Args:
        kl: :func:`kl_summary` rows (IOI, absolute budgets). eb: numeric table of
            :func:`effective_budget_means`. fade: :func:`fade_by_method` rows (Doc-String, K=50).
        ours: label of our column. task: the task of ``kl`` rows to use.
    Returns:
        (formatted table ``Quantity, Method, K, Llama-3.2-1B (paper), Gemma-2-2B (paper),
        <ours>``, numeric long table ``quantity, method, k, source, mean, std``). Derived rows
        give the relative KL reduction of FAP-Synergy over FAP at each K, which is comparable
        across model scales where raw KL values are not.
    """
    models = list(paper.IOI_KL)
    long: list[dict[str, Any]] = []

    def add(quantity: str, method: str, k: Any, source: str, mean: float, std: float = np.nan) -> None:
        long.append({"quantity": quantity, "method": method, "k": k, "source": source, "mean": mean, "std": std})

    # IOI KL table
    for method in ("clt-relp", "fap", "fap-synergy", "act-mag"):
        for k in (50, 100, 200):
            for mdl in models:
                mean, std = paper.IOI_KL[mdl][method][k]
                add("IOI last-token KL", method, k, mdl, mean, std)
            if kl is not None:
                r = cast(pd.DataFrame, kl[(kl["method"] == method) & (kl["k"] == k) & (kl["task"] == task)])
                if len(r):
                    add("IOI last-token KL", method, k, ours, float(r["mean"].iloc[0]), float(r["std"].iloc[0]))
    # relative improvement of the reranking
    for k in (50, 100, 200):
        for mdl in models:
            f, s = paper.IOI_KL[mdl]["fap"][k][0], paper.IOI_KL[mdl]["fap-synergy"][k][0]
            add("KL reduction FAP-Synergy vs FAP (%)", "fap-synergy", k, mdl, 100 * (f - s) / f)
        if kl is not None:
            sel = kl[(kl["k"] == k) & (kl["task"] == task)].set_index("method")["mean"]
            if {"fap", "fap-synergy"} <= set(sel.index) and sel["fap"] > 0:
                add(
                    "KL reduction FAP-Synergy vs FAP (%)",
                    "fap-synergy",
                    k,
                    ours,
                    100 * (sel["fap"] - sel["fap-synergy"]) / sel["fap"],
                )
    # effective budget
    for method, k in paper.EFFECTIVE_BUDGET[models[0]]:
        for mdl in models:
            add("Effective budget: IOI KL", method, k, mdl, paper.EFFECTIVE_BUDGET[mdl][(method, k)])
        if eb is not None:
            r = cast(pd.DataFrame, eb[(eb["method"] == method) & (eb["k"] == k)])
            if len(r):
                add("Effective budget: IOI KL", method, k, ours, float(r["mean"].iloc[0]), float(r["std"].iloc[0]))
    # FADE
    for metric in ("clarity", "purity", "responsiveness"):
        for mdl in models:
            add(f"FADE {metric} (Doc-String)", paper.FADE_METHOD, 50, mdl, paper.FADE_DOCSTRING_K50[mdl][metric])
        if fade is not None:
            r = cast(pd.DataFrame, fade[(fade["method"] == paper.FADE_METHOD) & (fade["k"].astype(float) == 50.0)])
            if len(r):
                add(
                    f"FADE {metric} (Doc-String)",
                    paper.FADE_METHOD,
                    50,
                    ours,
                    float(r[f"{metric}_mean"].iloc[0]),
                    float(r[f"{metric}_std"].iloc[0]),
                )
    numeric = pd.DataFrame(long)
    rows = []
    for key, g in numeric.groupby(["quantity", "method", "k"], sort=False):
        q, m, k = cast(tuple[str, str, Any], key)
        row = {"Quantity": q, "Method": label(m), "K": k}
        by = g.set_index("source")
        for src in [*models, ours]:
            col = f"{src} (paper)" if src in models else ours
            if src in by.index:
                r = by.loc[src]
                d = 1 if "%" in q else (3 if "FADE" in q else digits)
                row[col] = pm(float(r["mean"]), float(r["std"]), d)
            else:
                row[col] = "–"
        rows.append(row)
    return pd.DataFrame(rows), numeric


# --------------------------------------------------------------------------- related / sensitivity / toy
def cpr_cmd_runtime_table(cpr: pd.DataFrame, runtime: pd.DataFrame | None = None, digits: int = 3) -> pd.DataFrame:
    """``Method, CPR ↑, CMD ↓, [Prompts × seeds, Small-gap prompts,] Seconds / prompt`` from
    :func:`pie_lib.stats.mib_cpr_cmd` (value [95% CI]) or ``pie_lib.prune.related.mib.cpr_cmd``
    (mean ± std over per-prompt curves) and the runtime rows of
    :func:`pie_lib.experiments.runtime.time_methods` (``method, seconds_per_prompt``)."""
    rt = (
        cast(pd.Series, runtime.groupby("method")["seconds_per_prompt"].mean())
        if runtime is not None and len(runtime)
        else pd.Series(dtype=float)
    )
    rows = []
    with_ci = "cpr_ci_low" in cpr.columns  # pie_lib.stats.mib_cpr_cmd (aggregate curve, BCa CIs)

    def ci(r: Any, key: str) -> str:
        return f"{r[key]:.{digits}f} [{r[f'{key}_ci_low']:.{digits}f}, {r[f'{key}_ci_high']:.{digits}f}]"

    for m in _order(cpr["method"], None):
        r = cpr[cpr["method"] == m].iloc[0]
        row: dict[str, Any] = {
            "Method": label(m),
            "CPR ↑": ci(r, "cpr") if with_ci else pm(r["cpr"], r["cpr_std"], digits),
            "CMD ↓": ci(r, "cmd") if with_ci else pm(r["cmd"], r["cmd_std"], digits),
        }
        if with_ci:
            row["Prompts × seeds"] = f"{int(r['n_prompts'])} × {int(r['n_seeds'])}"
            row["Small-gap prompts"] = int(r["n_small_gap"])
        row["Seconds / prompt"] = f"{rt[m]:.3f}" if m in rt.index else "–"
        rows.append(row)
    return pd.DataFrame(rows)


def sensitivity_table(
    grid: pd.DataFrame, value: str = "kl", method: str = "fap-synergy", baseline: str | None = "fap"
) -> pd.DataFrame:
    """Mean ``value`` of ``method`` per (K, λ, boundary percent), and the baseline's at that K.

    Args:
        grid: rows of :func:`pie_lib.experiments.runs.sensitivity_grid` (columns ``lam, bp`` added).
    Returns:
        ``k, lam, bp, n, mean, std, baseline_mean, diff`` (diff = mean - baseline_mean).
    """
    d = grid[grid["method"] == method]
    out = d.groupby(["k", "lam", "bp"]).agg(n=(value, "size"), mean=(value, "mean"), std=(value, "std")).reset_index()
    if baseline is not None and bool((grid["method"] == baseline).any()):
        b = grid[grid["method"] == baseline].groupby("k")[value].mean().rename("baseline_mean")
        out = out.merge(b, left_on="k", right_index=True, how="left")
        out["diff"] = out["mean"] - out["baseline_mean"]
    return out


def format_sensitivity_table(table: pd.DataFrame, digits: int = 3) -> pd.DataFrame:
    """Wide layout: one row per (K, λ), one column per boundary percent (mean KL)."""
    w = table.pivot_table(index=["k", "lam"], columns="bp", values="mean").reset_index()
    w.columns = ["K", "λ", *[f"bp={c:g}" for c in w.columns[2:]]]
    for c in w.columns[2:]:
        w[c] = w[c].map(lambda x: "–" if pd.isna(x) else f"{x:.{digits}f}")
    if "baseline_mean" in table.columns:
        base = cast(pd.Series, table.groupby("k")["baseline_mean"].first())
        w["FAP"] = w["K"].map(lambda k: f"{base[k]:.{digits}f}" if k in base.index and bool(pd.notna(base[k])) else "–")
    w["K"] = w["K"].map(lambda k: f"{k:g}")
    w["λ"] = w["λ"].map(lambda x: f"{x:g}")
    return w


def toy_world_table(summary: dict[str, Any], recomputed: pd.DataFrame | None = None) -> pd.DataFrame:
    """Flatten the toy world's summary (``pie_lib.toy.toy_summary()``) into ``arch, quantity,
    value`` rows -- scalars and per-layer lists (one row per layer) -- and add a ``recomputed``
    column from ``recomputed`` (same ``arch, quantity`` keys) where given."""
    rows: list[dict[str, Any]] = []

    def walk(prefix: str, obj: Any, arch: str) -> None:
        if isinstance(obj, dict):
            for key, v in obj.items():
                walk(f"{prefix}.{key}" if prefix else str(key), v, arch)
        elif isinstance(obj, (list, tuple)) and obj and all(isinstance(v, (int, float)) for v in obj):
            for i, v in enumerate(obj):
                rows.append({"arch": arch, "quantity": f"{prefix}[{i}]", "value": float(v)})
        elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
            rows.append({"arch": arch, "quantity": prefix, "value": float(obj)})

    archs = summary.get("archs", summary) if isinstance(summary, dict) else {}
    for arch, body in archs.items():
        if isinstance(body, dict):
            walk("", body, str(arch))
    out = pd.DataFrame(rows, columns=["arch", "quantity", "value"])
    if recomputed is not None and len(recomputed):
        out = out.merge(recomputed[["arch", "quantity", "recomputed"]], on=["arch", "quantity"], how="outer")
    return out


__all__ = [
    "FADE_METRICS",
    "circuit_features",
    "cpr_cmd_runtime_table",
    "effective_budget_means",
    "fade_by_method",
    "format_ablation_table",
    "format_fade_table",
    "format_kl_table",
    "format_sensitivity_table",
    "kl_summary",
    "label",
    "paper_comparison",
    "pm",
    "sensitivity_table",
    "toy_world_table",
    "write_table",
]


# --------------------------------------------------------------------------- more builders
def metrics_summary(
    df: pd.DataFrame,
    metrics: Sequence[str] = ("kl", "pred_change", "faithfulness", "completeness"),
) -> pd.DataFrame:
    """Each metric per (task, budget, K, method), over prompts (seeds sharing a prompt averaged).

    ``faithfulness`` and ``completeness`` are MIB's ratios of means
    (:func:`pie_lib.stats.mib_faithfulness`) when the metric columns ``m_clean, m_null`` are
    there; the mean of per-prompt ratios is kept beside them as ``<metric>_mean_of_ratios``, and
    ``n_small_gap`` counts prompts with ``|m_clean - m_null| < 0.1``. Other metrics: the mean over
    prompts (:func:`pie_lib.stats.summarize`).

    Returns:
        ``task, budget, k, method, n (prompts), n_seeds, k_eff_mean, <metric>...`` and the
        ratio extras.
    """
    from pie_lib.stats import mib_faithfulness, summarize

    by = ["task", "budget", "k", "method"]
    d = df.assign(**{m: df[m].astype(float) for m in metrics}, k_eff=df["k_eff"].astype(float))
    base = summarize(d, by=by, value="k_eff", n_boot=0)
    out = base[[*by, "n_prompts", "n_seeds", "mean"]].rename(columns={"n_prompts": "n", "mean": "k_eff_mean"})
    extras = []
    for m in metrics:
        if m in ("faithfulness", "completeness") and {"m_clean", "m_null"} <= set(d.columns):
            f = mib_faithfulness(d, by=by, which=m, n_boot=0)
            f = f[[*by, m, "mean_of_ratios", "n_small_gap"]].rename(
                columns={"mean_of_ratios": f"{m}_mean_of_ratios", "n_small_gap": f"n_small_gap_{m}"}
            )
            extras += [f"{m}_mean_of_ratios", f"n_small_gap_{m}"]
        else:
            f = d.dropna(subset=[m])
            f = summarize(f, by=by, value=m, n_boot=0)[[*by, "mean"]].rename(columns={"mean": m}) if len(f) else None
            if f is None:
                out[m] = np.nan
                continue
        out = out.merge(f, on=by, how="left")
    return out[[*by, "n", "n_seeds", "k_eff_mean", *metrics, *extras]]


def format_metrics_table(summary: pd.DataFrame, digits: int = 3) -> pd.DataFrame:
    """Readable :func:`metrics_summary`: paper method names, K as "50" or "5%", n prompts × seeds."""
    t = summary.copy()
    t["method"] = t["method"].map(label)
    t["k"] = [f"{k:g}" if b == "abs" else f"{100 * k:g}%" for k, b in zip(t["k"], t["budget"])]
    if "n_seeds" in t.columns:
        t["n"] = [f"{int(n)} × {int(s)}" for n, s in zip(t["n"], t.pop("n_seeds"))]
    t = t[[c for c in t.columns if not c.endswith("_mean_of_ratios") and not c.startswith("n_small_gap")]]
    t = t.drop(columns="budget").rename(
        columns={
            "task": "Task",
            "k": "K",
            "method": "Method",
            "n": "Prompts × seeds",
            "k_eff_mean": "K_eff",
            "pred_change": "pred. change",
        }
    )
    for c in t.columns[4:]:
        t[c] = t[c].map(lambda x: "–" if pd.isna(x) else f"{x:.{digits}f}")
    return t


def top_descriptions(
    desc: pd.DataFrame, selections: Sequence[dict], method: str, k: float, n: int = 15
) -> pd.DataFrame:
    """The ``n`` features most often kept by ``method`` at ``k`` (over the circuits) with their
    descriptions: ``Layer, Feature, Circuits, Description``."""
    counts: dict[tuple[int, int], int] = {}
    for r in query_selections(selections, methods=method, ks=k):
        for key in {(int(l), int(f)) for l, _p, f in r["occurrences"]}:
            counts[key] = counts.get(key, 0) + 1
    d = desc.set_index(["layer", "feature"])["description"]
    rows = [
        {"Layer": l, "Feature": f, "Circuits": c, "Description": str(d.get((l, f), "–"))}
        for (l, f), c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n]
    ]
    return pd.DataFrame(rows, columns=["Layer", "Feature", "Circuits", "Description"])


def format_cost_table(cost: Any) -> pd.DataFrame:
    """Readable :class:`pie_lib.interpret.BudgetCostSaving`: per budget the circuits, features per
    circuit and per-circuit calls / tokens, then the saving row."""
    t = cost.table
    rows = []
    for _, r in t.iterrows():
        rows.append(
            {
                "K": int(r["k"]),
                "Method": label(r["method"]) if r["method"] != "any" else "any",
                "Circuits": int(r["n_circuits"]),
                "Features / circuit": f"{r['features_per_circuit']:.1f}",
                "Distinct features": int(r["n_unique_features"]),
                "Calls / circuit": f"{r['calls_per_circuit']:.1f}",
                "Tokens / circuit": f"{r['total_tokens_per_circuit']:.0f}",
            }
        )
    s = cost.saving

    def pct(key: str) -> str:
        v = s.get(key, float("nan"))
        return "–" if pd.isna(v) else f"{100 * v:.0f}%"

    rows.append(
        {
            "K": "saving",
            "Method": "",
            "Circuits": "",
            "Features / circuit": "",
            "Distinct features": pct("calls_union"),
            "Calls / circuit": pct("calls_per_circuit"),
            "Tokens / circuit": pct("total_tokens_per_circuit"),
        }
    )
    return pd.DataFrame(rows).astype(str)


def combine_runs(*frames: pd.DataFrame) -> pd.DataFrame:
    """Rows of several sweep folders over the same prompts as one table (first occurrence of a
    (method, budget, k, seed, prompt) wins)."""
    df = pd.concat([f for f in frames if f is not None and len(f)], ignore_index=True)
    return df.drop_duplicates(subset=["method", "budget", "k", "seed", "prompt_idx"], keep="first").reset_index(
        drop=True
    )


def merge_cpr_runtime(cpr: pd.DataFrame, runtime: pd.DataFrame | None) -> pd.DataFrame:
    """CPR / CMD rows with the runtime columns (``seconds_per_prompt``, ``seconds_select``) joined."""
    if runtime is None or not len(runtime):
        return cpr
    cols = ["seconds_per_prompt", "seconds_select", "seconds_context"]
    rt = cast(pd.DataFrame, runtime.groupby("method")[cols].mean()).reset_index()
    return cpr.merge(rt, on="method", how="left")


__all__ += [
    "combine_runs",
    "format_cost_table",
    "format_metrics_table",
    "merge_cpr_runtime",
    "metrics_summary",
    "top_descriptions",
]
