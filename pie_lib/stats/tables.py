"""The Effective-Budget table (one row per baseline) and dependency-free Markdown / LaTeX writers.

``tabulate`` is not a dependency, so :func:`to_markdown` and :func:`to_latex` format any
DataFrame themselves (plain strings; floats with a fixed number of digits).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, cast

import numpy as np
import pandas as pd

from pie_lib.stats.budget import Better, effective_budget
from pie_lib.stats.equivalence import tost
from pie_lib.stats.paired import paired_test


def effective_budget_table(
    df: pd.DataFrame,
    reference: str = "fap-synergy",
    k_ref: int = 50,
    k_cmp: int | None = 75,
    baselines: Sequence[str] | None = None,
    value: str = "kl",
    margin: float = 0.05,
    relative: bool = False,
    alpha: float = 0.05,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
    ks: Sequence[int] | None = None,
    seeds: Sequence[int] | None = None,
    better: Better = "lower",
    ratio_margin: float | None = 0.05,
) -> pd.DataFrame:
    """Tidy numeric table behind the claim "reference at k_ref matches the baselines at k_cmp".

    One row per baseline. K_eff columns come from :func:`effective_budget`; the comparison at
    ``k_cmp`` pairs ``(reference, k_ref)`` with ``(baseline, k_cmp)`` on the prompt as unit
    (:mod:`pie_lib.stats.design`): :func:`tost` (difference = reference - baseline, bounds
    ±margin; and, with ``ratio_margin``, the geometric-mean ratio within x(1 ± ratio_margin)) and
    :func:`paired_test`. Beside them, the baseline's *own* change from ``k_ref`` to ``k_cmp`` on
    the same prompts (``own_change`` = mean(baseline@k_cmp) - mean(baseline@k_ref), with its CI,
    and ``own_ratio`` = the geometric-mean ratio): when the margin or the equivalence bound is
    wider than that change, "equivalent at k_cmp" could not tell k_ref from k_cmp either.
    ``k_cmp=None`` leaves those columns out.

    Returns:
        DataFrame ``baseline, n_prompts, n_seeds, unit, design, k_eff_mean, k_eff_std, k_eff,
        k_eff_ci_low, k_eff_ci_high, frac_no_crossing, cost_saving, cost_saving_ci_low,
        cost_saving_ci_high, k_min, k_max, ref_mean`` and, with ``k_cmp``: ``cmp_mean, mean_diff,
        diff_ci_low, diff_ci_high, margin, tost_delta, tost_p, equivalent, equivalence_bound,
        gm_ratio, ratio_ci_low, ratio_ci_high, ratio_margin, ratio_p, ratio_equivalent,
        ratio_bound, own_change, own_change_ci_low, own_change_ci_high, own_ratio, paired_p_t,
        paired_p_wilcoxon``. ``k_eff`` is the pooled estimate; inf = beyond the ladder, NaN =
        below it; ``k_eff_std`` is the spread of the per-seed K_eff (the seed component).
        ``attrs`` records the settings (used by :func:`format_effective_budget_table`).
    """
    eb = effective_budget(df, reference, k_ref, baselines, value, n_boot, seed, level, ks, seeds, better)
    s = eb.summary
    out = pd.DataFrame(
        {
            "baseline": s["baseline"],
            "n_prompts": s["n_prompts"],
            "n_seeds": s["n_seeds"],
            "unit": s["unit"],
            "design": s["design"],
            "k_eff_mean": s["k_eff_mean"],
            "k_eff_std": s["k_eff_std"],
            "k_eff": s["k_eff"],
            "k_eff_ci_low": s["ci_low"],
            "k_eff_ci_high": s["ci_high"],
            "frac_no_crossing": s["frac_no_crossing"],
            "cost_saving": s["cost_saving"],
            "cost_saving_ci_low": s["saving_ci_low"],
            "cost_saving_ci_high": s["saving_ci_high"],
            "k_min": s["k_min"],
            "k_max": s["k_max"],
            "ref_mean": s["ref_mean"],
        }
    )
    if k_cmp is not None:
        cmp = []
        for base in out["baseline"]:
            t = tost(df, (reference, k_ref), (base, k_cmp), value, margin, relative, alpha, seeds, ratio_margin)
            p = paired_test(df, (reference, k_ref), (base, k_cmp), value, seeds, n_boot, seed, level)
            own = dict(own_change=np.nan, own_change_ci_low=np.nan, own_change_ci_high=np.nan, own_ratio=np.nan)
            if k_ref != k_cmp and set(df.loc[df["method"] == base, "k"].tolist()) >= {k_ref, k_cmp}:
                o = paired_test(df, (base, k_cmp), (base, k_ref), value, seeds, n_boot, seed, level)
                own = dict(
                    own_change=o.mean_diff,
                    own_change_ci_low=o.ci_low,
                    own_change_ci_high=o.ci_high,
                    own_ratio=o.gm_ratio,
                )
            cmp.append(
                {
                    "cmp_mean": t.mean_b,
                    "mean_diff": t.mean_diff,
                    "diff_ci_low": p.ci_low,
                    "diff_ci_high": p.ci_high,
                    "margin": t.margin,
                    "tost_delta": t.delta,
                    "tost_p": t.p_value,
                    "equivalent": t.equivalent,
                    "equivalence_bound": t.equivalence_bound,
                    "gm_ratio": t.gm_ratio,
                    "ratio_ci_low": t.ratio_ci_low,
                    "ratio_ci_high": t.ratio_ci_high,
                    "ratio_margin": t.ratio_margin,
                    "ratio_p": t.ratio_p_value,
                    "ratio_equivalent": t.ratio_equivalent,
                    "ratio_bound": t.ratio_bound,
                    **own,
                    "paired_p_t": p.p_t,
                    "paired_p_wilcoxon": p.p_wilcoxon,
                }
            )
        out = pd.concat([out, pd.DataFrame(cmp, index=out.index)], axis=1)
    out.attrs.update(
        reference=reference,
        k_ref=k_ref,
        k_cmp=k_cmp,
        value=value,
        margin=margin,
        relative=relative,
        alpha=alpha,
        level=level,
        n_boot=n_boot,
        seed=seed,
        ratio_margin=ratio_margin,
    )
    return out


def _k(x: float, k_min: float, k_max: float, digits: int) -> str:
    if np.isposinf(x):
        return f"> {k_max:g}"
    if np.isnan(x):
        return f"< {k_min:g}"
    return f"{x:.{digits}f}"


def _pct(x: float, bound: str | None = None) -> str:
    return bound if (np.isnan(x) and bound) else ("–" if np.isnan(x) else f"{100 * x:.0f}%")


def _p(x: float) -> str:
    return "–" if np.isnan(x) else ("< 0.001" if x < 0.001 else f"{x:.3f}")


def format_effective_budget_table(table: pd.DataFrame, digits: int = 1) -> pd.DataFrame:
    """Human-readable strings of :func:`effective_budget_table` (one column per reported quantity).

    K values beyond the ladder print as ``> K_max``, below it as ``< K_min``; savings print as
    percentages, bounded (``> x%``) when K_eff is beyond the ladder.
    """
    a = table.attrs
    k_ref, k_cmp = a.get("k_ref", "k_ref"), a.get("k_cmp")
    lvl = f"{100 * a.get('level', 0.95):.0f}%"
    rows = []
    for _, row_ in table.iterrows():
        r = cast(Mapping[str, Any], row_)  # a row: label -> scalar (the stubs type items as Series)
        kmin, kmax = r["k_min"], r["k_max"]
        floor = f"> {100 * (1 - k_ref / kmax):.0f}%" if isinstance(k_ref, (int, float)) else None
        ceil = f"< {100 * (1 - k_ref / kmin):.0f}%" if isinstance(k_ref, (int, float)) else None

        def sv(x: float, k: float) -> str:
            return _pct(x, floor if np.isposinf(k) else ceil)

        mean = _k(r["k_eff_mean"], kmin, kmax, digits)
        row = {
            "Baseline": r["baseline"],
            "K_eff (seeds)": mean
            if np.isnan(r["k_eff_std"]) or not np.isfinite(r["k_eff_mean"])
            else f"{mean} ± {r['k_eff_std']:.{digits}f}",
            f"K_eff pooled [{lvl} CI]": f"{_k(r['k_eff'], kmin, kmax, digits)} "
            f"[{_k(r['k_eff_ci_low'], kmin, kmax, digits)}, {_k(r['k_eff_ci_high'], kmin, kmax, digits)}]",
            "No crossing": f"{100 * r['frac_no_crossing']:.0f}%",
            f"Cost saving [{lvl} CI]": f"{sv(r['cost_saving'], r['k_eff'])} "
            f"[{sv(r['cost_saving_ci_low'], r['k_eff_ci_low'])}, {sv(r['cost_saving_ci_high'], r['k_eff_ci_high'])}]",
        }
        row["Prompts × seeds (unit)"] = f"{r['n_prompts']} × {r['n_seeds']} ({r['unit']})" if "unit" in r else ""
        if k_cmp is not None and "tost_p" in table.columns:
            g = lambda x: "–" if np.isnan(x) else f"{x:.3g}"  # noqa: E731
            pc = lambda x: "–" if np.isnan(x) else f"{100 * (x - 1):+.1f}%"  # noqa: E731
            row[f"Ref@{k_ref} − base@{k_cmp} [{lvl} CI]"] = (
                f"{g(r['mean_diff'])} [{g(r['diff_ci_low'])}, {g(r['diff_ci_high'])}]"
            )
            margin_txt = f"±{g(r['tost_delta'])}" + (" (rel.)" if a.get("relative") else "")
            row["TOST margin / bound"] = f"{margin_txt} / {g(r['equivalence_bound'])}"
            row["TOST p"] = _p(r["tost_p"])
            row["Equivalent"] = "yes" if r["equivalent"] else "no"
            rm = r.get("ratio_margin", np.nan)
            row[f"GM ratio [{100 * (1 - 2 * a.get('alpha', 0.05)):.0f}% CI]"] = (
                f"{pc(r['gm_ratio'])} [{pc(r['ratio_ci_low'])}, {pc(r['ratio_ci_high'])}]"
            )
            row["Ratio margin / bound"] = (f"±{100 * rm:g}%" if not np.isnan(rm) else "–") + (
                f" / {100 * r['ratio_bound']:.1f}%" if not np.isnan(r["ratio_bound"]) else " / –"
            )
            row["Ratio equiv."] = (
                "–" if np.isnan(rm) or np.isnan(r["gm_ratio"]) else ("yes" if r["ratio_equivalent"] else "no")
            )
            row[f"Own change @{k_ref}→@{k_cmp}"] = (
                "–" if np.isnan(r["own_change"]) else f"{g(r['own_change'])} ({pc(r['own_ratio'])})"
            )
            row["Paired p (t / W)"] = f"{_p(r['paired_p_t'])} / {_p(r['paired_p_wilcoxon'])}"
        rows.append(row)
    return pd.DataFrame(rows)


def _cells(df: pd.DataFrame, floatfmt: str, index: bool) -> tuple[list[str], list[list[str]]]:
    def fmt(v: object) -> str:
        if isinstance(v, (float, np.floating)):
            return "–" if math.isnan(v) else (("inf" if v > 0 else "-inf") if math.isinf(v) else format(v, floatfmt))
        return "" if v is pd.NA or v is None else str(v)

    head = ([str(df.index.name or "")] if index else []) + [str(c) for c in df.columns]
    body = [([fmt(i)] if index else []) + [fmt(v) for v in row] for i, row in zip(df.index, df.itertuples(index=False))]
    return head, body


def to_markdown(df: pd.DataFrame, floatfmt: str = ".3g", index: bool = False) -> str:
    """A GitHub-flavoured Markdown table of ``df`` (no ``tabulate`` needed); ``|`` is escaped."""
    head, body = _cells(df, floatfmt, index)
    esc = [[c.replace("|", "\\|") for c in row] for row in [head, *body]]
    width = [max(3, *(len(row[j]) for row in esc)) for j in range(len(head))]
    line = lambda row: "| " + " | ".join(c.ljust(w) for c, w in zip(row, width)) + " |"  # noqa: E731
    return "\n".join([line(esc[0]), "| " + " | ".join("-" * w for w in width) + " |", *map(line, esc[1:])]) + "\n"


_LATEX = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "±": r"$\pm$",
    "≤": r"$\le$",
    "≥": r"$\ge$",
    "<": r"$<$",
    ">": r"$>$",
    "–": "--",
}


def _tex(s: str) -> str:
    return "".join(_LATEX.get(ch, ch) for ch in s)


def to_latex(
    df: pd.DataFrame, floatfmt: str = ".3g", index: bool = False, caption: str | None = None, label: str | None = None
) -> str:
    """A booktabs ``tabular`` of ``df`` (special characters escaped; ± ≤ ≥ < > as math)."""
    head, body = _cells(df, floatfmt, index)
    lines = [
        r"\begin{tabular}{l" + "r" * (len(head) - 1) + "}",
        r"\toprule",
        " & ".join(map(_tex, head)) + r" \\",
        r"\midrule",
        *(" & ".join(map(_tex, row)) + r" \\" for row in body),
        r"\bottomrule",
        r"\end{tabular}",
    ]
    if caption or label:
        inner = [r"\begin{table}[t]", r"\centering", *lines]
        inner += [rf"\caption{{{_tex(caption)}}}"] if caption else []
        inner += [rf"\label{{{label}}}"] if label else []
        lines = [*inner, r"\end{table}"]
    return "\n".join(lines) + "\n"
