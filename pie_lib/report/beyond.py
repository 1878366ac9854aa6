"""Figures and tables of notebook 07 (beyond the paper), from result tables only."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd

from pie_lib.report.tables import label


def plot_beyond_effective_budget(eb: pd.DataFrame, out_dir: str | Path, name: str) -> Any:
    """K_eff (with its CI) of each new method against FAP (dashed) and FAP-Synergy (solid), per
    task, over k_ref; the grey lines are K_eff = k_ref (no saving) and K_eff = k_ref / 2 (the goal).

    Args:
        eb: :func:`pie_lib.experiments.beyond.beyond_effective_budget` rows.
    """
    import matplotlib.pyplot as plt

    from pie_lib.report.plots import TASK_LABELS, color, save_figure

    tasks = sorted(eb["task"].unique())
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.4 * len(tasks), 3.4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        d = cast(pd.DataFrame, eb[eb["task"] == task])
        ks = np.array(sorted(d["k_ref"].unique()), dtype=float)
        ax.plot(ks, ks, color="0.6", lw=1, label="K_eff = k_ref")
        ax.plot(ks, ks / 2, color="0.3", lw=1, ls=":", label="K_eff = k_ref / 2 (goal)")
        for key, g in d.groupby(["method", "reference"], sort=True):
            method, ref = cast(tuple[str, str], key)
            g = g.sort_values("k_ref")
            y = g["k_eff"].to_numpy(float)
            lo = np.where(np.isnan(g["k_eff_ci_low"].to_numpy(float)), y, g["k_eff_ci_low"].to_numpy(float))
            hi = g["k_eff_ci_high"].to_numpy(float)
            shift = 1.03 if ref == "fap" else 0.97  # keep the two references' bars apart
            x = g["k_ref"].to_numpy(float) * shift
            ok = np.isfinite(y)
            ax.errorbar(
                x[ok],
                y[ok],
                yerr=[np.clip(y - lo, 0, None)[ok], np.clip(np.nan_to_num(hi, nan=0) - y, 0, None)[ok]],
                color=color(method),
                ls="--" if ref == "fap" else "-",
                marker="o",
                ms=3,
                lw=1.2,
                capsize=2,
                label=f"{label(method)} vs {label(ref)}",
            )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("k_ref (reference budget)")
        ax.set_ylabel("K_eff (new method)")
        ax.set_title(TASK_LABELS.get(task, task))
        ax.grid(alpha=0.3, lw=0.5)
    fig.tight_layout()
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=3, frameon=False, bbox_to_anchor=(0.5, 0.0), fontsize=8)
    save_figure(fig, name, out_dir)
    return fig


def format_beyond_effective_budget(eb: pd.DataFrame) -> pd.DataFrame:
    """Readable table: K_eff [95% CI] per task, method, reference and k_ref."""

    def fmt(x: float) -> str:
        return "< ladder" if np.isnan(x) else ("> ladder" if np.isinf(x) else f"{x:.1f}")

    return pd.DataFrame(
        {
            "Task": eb["task"],
            "Method": eb["method"].map(label),
            "Reference": eb["reference"].map(label),
            "k_ref": eb["k_ref"],
            "K_eff [95% CI]": [
                f"{fmt(a)} [{fmt(b)}, {fmt(c)}]"
                for a, b, c in zip(eb["k_eff"], eb["k_eff_ci_low"], eb["k_eff_ci_high"])
            ],
            "n prompts": eb["n_prompts"],
            "n seeds": eb["n_seeds"],
        }
    )


__all__ = ["format_beyond_effective_budget", "plot_beyond_effective_budget"]
