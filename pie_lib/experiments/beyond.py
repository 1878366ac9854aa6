"""Notebook 07 (beyond the paper): sweeps, costs, effective budgets and the goal of issue #17.

- :func:`run_beyond` -- the sweeps (resumable ``pie prune`` folders, one per task) of FAP,
  FAP-Synergy and the three new methods over one K ladder;
- :func:`method_costs` -- forwards and seconds per prompt of each method's *selection* (a fresh
  batch context per method, so no method profits from another's cached gradients or effects);
- :func:`beyond_effective_budget` -- the K at which each new method matches a reference method's
  KL at ``k_ref`` (the ``beyond_effective_budget`` table: exactly ``task, method, reference, k_ref,
  k_eff, k_eff_ci_low, k_eff_ci_high, n_prompts, n_seeds``), from :func:`pie_lib.stats.effective_budget`;
- :func:`goal_table` -- where FAP-Synergy beats FAP, and whether a method reaches
  ``k_eff_ci_high <= k_ref / 2`` against FAP-Synergy there.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from pie_lib.data.tasks import Task

NEW_METHODS: tuple[str, ...] = ("fap-ig", "fap-iterative", "greedy-refine")
REFERENCES: tuple[str, ...] = ("fap", "fap-synergy")
EB_COLUMNS = ["task", "method", "reference", "k_ref", "k_eff", "k_eff_ci_low", "k_eff_ci_high", "n_prompts", "n_seeds"]


def beyond_extra(ig_steps: int = 16, iter_rounds: int = 4, refine: dict | None = None) -> dict:
    """``MethodParams.extra`` of the new methods holding only what differs from their defaults, so
    a notebook run and a plain ``pie prune --methods fap-ig,...`` share one sweep folder identity."""
    from pie_lib.prune.beyond.config import IgConfig, IterativeConfig, RefineConfig

    extra: dict = {}
    if ig_steps != IgConfig().steps:
        extra["ig_steps"] = int(ig_steps)
    if iter_rounds != IterativeConfig().rounds:
        extra["iter_rounds"] = int(iter_rounds)
    defaults = RefineConfig()
    for key, value in (refine or {}).items():
        name = key.removeprefix("refine_")
        if not hasattr(defaults, name) or getattr(defaults, name) != value:
            extra[key] = value  # unknown keys pass through: the method's config names them in its error
    return extra


def run_beyond(
    tasks: Sequence[str],
    runs: str,
    world: tuple[Any, Any] | None = None,
    seeds_by_task: dict[str, Sequence[int]] | None = None,
    **params: Any,
) -> pd.DataFrame:
    """One resumable sweep per task into ``<runs>/<model>/07_beyond/<task>``; all rows (absolute budgets)."""
    from pie_lib.experiments.runs import prune_tasks

    df = prune_tasks(tasks, runs, "07_beyond", world=world, seeds_by_task=seeds_by_task, **params)
    return cast(pd.DataFrame, df[df["budget"] == "abs"]).reset_index(drop=True)


def method_costs(
    world: tuple[Any, Any],
    task: str,
    methods: Sequence[str],
    ks: Sequence[int],
    n: int = 16,
    seed: int = 0,
    data_seed: int = 0,
    extra: dict | None = None,
    chunk: int = 512,
    batch_size: int = 16,
) -> pd.DataFrame:
    """Cost of each method's selection per prompt: sequence forwards (a forward + backward counts
    once) and wall seconds, on ``n`` generated prompts of ``task``.

    Every (method, K) gets a fresh :class:`~pie_lib.prune.context.BatchContext`; the context
    itself (clean + corrupted forwards, active set, decoder rows) is shared by every method and
    reported as the row ``method="(context)"``. Seconds depend on the machine and its load.

    Returns:
        ``task, method, k, n_prompts, forwards_per_prompt, seconds_per_prompt``.
    """
    from pie_lib.data.tasks import generate_task
    from pie_lib.engine.attribution import count_forwards
    from pie_lib.prune.context import BatchContext, ScoringConfig
    from pie_lib.prune.occurrences import tokenize_pairs
    from pie_lib.prune.params import MethodParams
    from pie_lib.prune.registry import get_methods

    model, clt = world
    pairs = generate_task(cast("Task", task), model.tokenizer, n, seed=data_seed).pairs
    batches = tokenize_pairs(model, pairs, batch_size=batch_size).batches
    params = MethodParams(extra=dict(extra or {}))
    scoring = ScoringConfig(chunk=chunk)
    rows = []
    n_prompts = sum(b.size for b in batches)
    fw, secs = 0, 0.0
    for b in batches:
        with count_forwards(model) as c:
            t0 = time.perf_counter()
            BatchContext(model, clt, b, scoring)
            secs += time.perf_counter() - t0
        fw += c.n
    rows.append(
        {
            "task": task,
            "method": "(context)",
            "k": np.nan,
            "n_prompts": n_prompts,
            "forwards_per_prompt": fw / n_prompts,
            "seconds_per_prompt": secs / n_prompts,
        }
    )
    for m in get_methods(list(methods)):
        for k in ks:
            fw, secs = 0, 0.0
            for b in batches:
                ctx = BatchContext(model, clt, b, scoring)
                with count_forwards(model) as c:
                    t0 = time.perf_counter()
                    m.select(ctx, int(k), seed, params)
                    secs += time.perf_counter() - t0
                fw += c.n
            rows.append(
                {
                    "task": task,
                    "method": m.name,
                    "k": int(k),
                    "n_prompts": n_prompts,
                    "forwards_per_prompt": fw / n_prompts,
                    "seconds_per_prompt": secs / n_prompts,
                }
            )
    return pd.DataFrame(rows)


def beyond_effective_budget(
    df: pd.DataFrame,
    k_refs: Sequence[int],
    methods: Sequence[str] = NEW_METHODS,
    references: Sequence[str] = REFERENCES,
    n_boot: int = 2000,
    seed: int = 0,
) -> pd.DataFrame:
    """For each task, new method, reference and ``k_ref``: the K at which the method's mean KL
    curve reaches the reference's mean KL at ``k_ref`` (:func:`pie_lib.stats.effective_budget`,
    no extrapolation: ``inf`` = not reached inside the ladder, NaN = already better at its
    smallest K), with its bootstrap CI.

    Returns:
        exactly the columns :data:`EB_COLUMNS`; ``n_prompts`` = distinct prompts, ``n_seeds`` = seeds.
    """
    from pie_lib.stats import effective_budget

    out = []
    for task, d in df.groupby("task", sort=True):
        for ref in references:
            for k_ref in k_refs:
                if d[(d["method"] == ref) & (d["k"] == k_ref)].empty:
                    continue
                present = [m for m in methods if m in set(d["method"])]
                if not present:
                    continue
                res = effective_budget(
                    d, reference=ref, k_ref=int(k_ref), baselines=present, value="kl", n_boot=n_boot, seed=seed
                )
                n_prompts = d.loc[(d["method"] == ref) & (d["k"] == k_ref), "prompt_idx"].nunique()
                n_seeds = d.loc[(d["method"] == ref) & (d["k"] == k_ref), "seed"].nunique()
                for r in res.summary.itertuples():
                    out.append(
                        {
                            "task": task,
                            "method": r.baseline,
                            "reference": ref,
                            "k_ref": int(k_ref),
                            "k_eff": float(r.k_eff),
                            "k_eff_ci_low": float(r.ci_low),
                            "k_eff_ci_high": float(r.ci_high),
                            "n_prompts": int(n_prompts),
                            "n_seeds": int(n_seeds),
                        }
                    )
    return pd.DataFrame(out, columns=EB_COLUMNS)


def _reached(ci_high: float, k_ref: int, d: pd.DataFrame, method: str) -> bool:
    """``k_eff_ci_high <= k_ref / 2``; a NaN upper bound means the interval lies below the method's
    smallest K (it beats the reference there), which counts when that K is itself <= k_ref / 2."""
    if np.isnan(ci_high):
        return bool(d.loc[d["method"] == method, "k"].min() <= k_ref / 2)
    return bool(ci_high <= k_ref / 2)


def goal_table(
    df: pd.DataFrame, eb: pd.DataFrame, costs: pd.DataFrame | None = None, n_boot: int = 2000, seed: int = 0
) -> pd.DataFrame:
    """The goal of issue #17, per task, new method and ``k_ref`` (reference FAP-Synergy):

    - ``syn_beats_fap``: FAP-Synergy's mean KL at k_ref is below FAP's, with the paired
      difference's bootstrap CI (FAP - FAP-Synergy, over (seed, prompt) units) and its t-test p;
    - ``reached``: ``k_eff_ci_high <= k_ref / 2`` against FAP-Synergy;
    - with ``costs``: the method's cost (forwards and seconds per prompt) at ``k_half = k_ref // 2``
      and FAP-Synergy's at ``k_ref`` (NaN where that K was not measured).
    """
    from pie_lib.stats import paired_test

    rows = []
    syn = eb[eb["reference"] == "fap-synergy"]
    for r in syn.itertuples():
        d = cast(pd.DataFrame, df[df["task"] == r.task])
        pt = paired_test(d, ("fap", r.k_ref), ("fap-synergy", r.k_ref), value="kl", n_boot=n_boot, seed=seed)
        row = {
            "task": r.task,
            "method": r.method,
            "k_ref": r.k_ref,
            "kl_fap": pt.mean_a,
            "kl_fap_synergy": pt.mean_b,
            "fap_minus_syn": pt.mean_diff,
            "fap_minus_syn_ci_low": pt.ci_low,
            "fap_minus_syn_ci_high": pt.ci_high,
            "p_t": pt.p_t,
            "syn_beats_fap": bool(pt.mean_diff > 0),
            "k_eff": r.k_eff,
            "k_eff_ci_high": r.k_eff_ci_high,
            "half_k_ref": r.k_ref / 2,
            "reached": _reached(r.k_eff_ci_high, r.k_ref, d, r.method),
        }
        if costs is not None:  # the new method at half the budget against FAP-Synergy at the full one
            row["k_half"] = int(r.k_ref // 2)
            for prefix, method, kk in (("", r.method, row["k_half"]), ("syn_", "fap-synergy", r.k_ref)):
                c = cast(
                    pd.DataFrame, costs[(costs["task"] == r.task) & (costs["method"] == method) & (costs["k"] == kk)]
                )
                for col in ("forwards_per_prompt", "seconds_per_prompt"):
                    row[prefix + col] = float(c[col].iloc[0]) if len(c) else np.nan
        rows.append(row)
    return pd.DataFrame(rows)


def goal_summary(goal: pd.DataFrame) -> str:
    """One line per (task, method): the k_ref where FAP-Synergy beats FAP, and where the goal is reached."""
    lines = []
    for key, g in goal.groupby(["task", "method"], sort=True):
        task, method = cast("tuple[str, str]", key)
        beats = g[g["syn_beats_fap"]]
        hit = beats[beats["reached"]]["k_ref"].tolist()
        miss = beats[~beats["reached"]]["k_ref"].tolist()
        lines.append(
            f"{task:10s} {method:14s} FAP-Synergy beats FAP at k_ref={beats['k_ref'].tolist()}: "
            f"goal reached at {hit or 'none'}, not reached at {miss or 'none'}"
        )
    return "\n".join(lines)


__all__ = [
    "EB_COLUMNS",
    "beyond_extra",
    "goal_summary",
    "NEW_METHODS",
    "REFERENCES",
    "beyond_effective_budget",
    "goal_table",
    "method_costs",
    "run_beyond",
]
