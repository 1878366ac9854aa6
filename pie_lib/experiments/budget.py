"""The Effective-Budget report: tables and figure of "reference at K_ref matches baselines at K_cmp".

One call per (K_ref, K_cmp) comparison writes, from the sweep rows only:

- ``effective_budget_means[<sfx>]`` -- the paper's line: mean ± std of the reference at K_ref and
  of FAP / CLT-RelP at K_cmp (:func:`pie_lib.report.tables.effective_budget_means`);
- ``effective_budget[<sfx>]`` -- K_eff per baseline with its bootstrap CI, the budget saving
  ``1 - K_ref / K_eff``, TOST of reference@K_ref against baseline@K_cmp and paired tests
  (:func:`pie_lib.stats.effective_budget_table`);
- the figure ``effective_budget[<sfx>]`` (:func:`pie_lib.report.plots.plot_effective_budget`).

``<sfx>`` is empty for the paper's K=50 vs 75 and ``_k<ref>_<cmp>`` otherwise (e.g. the toy
world's unsaturated analog K=8 vs 12); figure names get the model suffix of
:func:`pie_lib.experiments.runs.fig_name`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import cast

import pandas as pd

from pie_lib.experiments.runs import fig_name, slug
from pie_lib.report import plots, tables


def suffix(k_ref: int, k_cmp: int) -> str:
    """ "" for the paper's comparison (50 vs 75), "_k<ref>_<cmp>" for any other."""
    return "" if (int(k_ref), int(k_cmp)) == (50, 75) else f"_k{int(k_ref)}_{int(k_cmp)}"


def effective_budget_report(
    df: pd.DataFrame,
    figures: str | Path,
    model: str = "toy",
    reference: str = "fap-synergy",
    k_ref: int = 50,
    k_cmp: int = 75,
    baselines: Sequence[str] = ("fap", "clt-relp", "act-mag", "random"),
    margin: float = 0.05,
    relative: bool = False,
    n_boot: int = 2000,
    seed: int = 0,
    ratio_margin: float | None = 0.05,
) -> dict[str, pd.DataFrame]:
    """Write the Effective-Budget tables and figure of one comparison; return the tables.

    Args:
        df: sweep rows with absolute budgets (``budget == "abs"``) including ``k_ref``, ``k_cmp``
            and a ladder around them, for the reference and every baseline, over >= 1 seed.
        figures: figure folder (tables go to ``<figures>/tables``). model: names the files.
        margin: pre-specified absolute TOST margin (KL units); relative: take it as a fraction of
            the baseline's estimated mean instead (random; not the default).
        ratio_margin: pre-specified log-scale margin: geometric-mean KL within x(1 ± r).
    Returns:
        ``{"line": ..., "line_data": ..., "table": ..., "table_data": ...}`` (formatted / numeric).
    """
    from pie_lib.stats import effective_budget_table, format_effective_budget_table

    d = cast(pd.DataFrame, df[df["budget"] == "abs"]) if "budget" in df.columns else df
    sfx = suffix(k_ref, k_cmp)
    tab_dir = Path(figures) / "tables"
    pair = [b for b in ("fap", "clt-relp") if b in baselines] or list(baselines)[:1]
    line, line_data = tables.effective_budget_means(d, reference, k_ref, k_cmp, pair, model=slug(model))
    tables.write_table(
        line,
        fig_name(f"effective_budget_means{sfx}", model),
        tab_dir,
        data=line_data,
        caption=f"Effective budget: {tables.label(reference)} at K={k_ref} vs baselines at K={k_cmp} "
        "(mean ± std over prompts of last-token KL; seeds sharing a prompt averaged within it)",
    )
    eb = effective_budget_table(
        d,
        reference,
        k_ref,
        k_cmp,
        list(baselines),
        margin=margin,
        relative=relative,
        n_boot=n_boot,
        seed=seed,
        ratio_margin=ratio_margin,
    )
    eb_fmt = format_effective_budget_table(eb)
    kind = f"±{100 * margin:g}% of the baseline's estimated mean" if relative else f"±{margin:g} KL"
    if ratio_margin is not None:
        kind += f", geometric-mean ratio within ×(1 ± {ratio_margin:g})"
    first = eb.iloc[0] if len(eb) else None
    units = (
        f"; {first['n_prompts']} prompts × {first['n_seeds']} seeds, unit: {first['unit']}" if first is not None else ""
    )
    tables.write_table(
        eb_fmt,
        fig_name(f"effective_budget{sfx}", model),
        tab_dir,
        data=eb,
        caption=f"Effective budget of {tables.label(reference)} at K={k_ref}: K_eff with 95% CI, "
        f"budget saving, TOST at K={k_cmp} (pre-specified margins {kind}; equivalence bound = the smallest "
        f"margin that would pass; beside it each baseline's own K={k_ref}→{k_cmp} change{units})",
    )
    plots.plot_effective_budget(
        d,
        figures,
        fig_name(f"effective_budget{sfx}", model),
        reference,
        k_ref,
        k_cmp,
        [b for b in baselines if b != "random"] or list(baselines),
        eb_table=eb,
        n_boot=n_boot,
    )
    return {"line": line, "line_data": line_data, "table": eb_fmt, "table_data": eb}


__all__ = ["effective_budget_report", "suffix"]
