"""The three methods beyond the paper as registry entries (issue #17).

==================  ================================================================  ===========
name                what                                                              extra keys
==================  ================================================================  ===========
``fap-ig``          top-K by FAP-IG: Δa · mean over the corrupted -> clean path of     ``ig_*``
                    the replacement-gradient projection (``--ig-steps``, default 16)
``fap-iterative``   FAP re-attributed at the partially pruned point, R rounds         ``iter_*``
``greedy-refine``   exact batched swaps on top of a method's K-circuit                ``refine_*``
                    (FAP-Synergy by default), bounded forwards
==================  ================================================================  ===========

Scores recorded with a selection: FAP-IG's scores; FAP-iterative's last-round score of each
occurrence; greedy-refine the start method's scores (its selection is not a top-K of any score).
"""

from __future__ import annotations

import torch

from pie_lib.errors import BudgetError
from pie_lib.prune.beyond.config import IgConfig, IterativeConfig, RefineConfig, config_from_extra
from pie_lib.prune.beyond.ig import fap_ig_scores
from pie_lib.prune.beyond.iterative import iterative_select
from pie_lib.prune.beyond.refine import refine_circuits
from pie_lib.prune.context import BatchContext
from pie_lib.prune.params import MethodParams
from pie_lib.prune.registry import load_plugins, register_method
from pie_lib.prune.select import Budget, budget_per_prompt, topk_global

Selection = tuple[torch.Tensor, torch.Tensor]
BEYOND_METHODS = ("fap-ig", "fap-iterative", "greedy-refine")


def fap_ig(ctx: BatchContext, k: Budget, seed: int, params: MethodParams) -> Selection:
    """Top-K by |FAP-IG| (see :mod:`pie_lib.prune.beyond.ig`)."""
    s = fap_ig_scores(ctx, config_from_extra(IgConfig, params.extra))
    return topk_global(ctx.occ, s, k), s


def fap_iterative(ctx: BatchContext, k: Budget, seed: int, params: MethodParams) -> Selection:
    """FAP re-attributed at the partially pruned point (see :mod:`pie_lib.prune.beyond.iterative`)."""
    cfg = config_from_extra(IterativeConfig, params.extra)
    kv = budget_per_prompt(k, ctx.occ.n_prompts)
    return iterative_select(ctx, kv, cfg)


def greedy_refine(ctx: BatchContext, k: Budget, seed: int, params: MethodParams) -> Selection:
    """The start method's K-circuit refined by exact swaps (see :mod:`pie_lib.prune.beyond.refine`)."""
    cfg = config_from_extra(RefineConfig, params.extra)
    if cfg.start == "greedy-refine":
        raise BudgetError(f"refine_start={cfg.start!r}: greedy-refine cannot start from itself; name another method")
    methods = load_plugins()
    if cfg.start not in methods:
        raise BudgetError(f"refine_start={cfg.start!r} is not a method; choose from {sorted(methods)}")
    kv = budget_per_prompt(k, ctx.occ.n_prompts)
    keep0, s0 = methods[cfg.start].select(ctx, kv, seed, params)
    keep, trace = refine_circuits(ctx, keep0, s0, cfg)
    ctx.__dict__.setdefault("refine_traces", []).append(trace)  # forwards, swaps, KL per prompt (tests)
    return keep, s0


register_method(
    "fap-ig",
    fap_ig,
    False,
    "FAP-IG: replacement gradient integrated along the corrupted -> clean path (--ig-steps, default 16)",
)
register_method(
    "fap-iterative",
    fap_iterative,
    False,
    "FAP re-attributed at the partially pruned point, iter_rounds rounds (default 4)",
)
register_method(
    "greedy-refine",
    greedy_refine,
    True,
    "Exact batched swaps on top of a method's top-K (refine_start, default FAP-Synergy; seeded like it)",
)

__all__ = ["BEYOND_METHODS", "fap_ig", "fap_iterative", "greedy_refine"]
