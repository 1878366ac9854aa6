"""FAP-IG: FAP with the replacement gradient integrated along the path corrupted -> clean.

``S_IG(l, t, i) = Δa · mean_α <sum_{s>=l} W_dec[l][i, s-l], g_s(α)>``, where ``g(α)`` is the
metric gradient (replacement setting by default) at path point α. Our reading of "the path from
the corrupted to the clean CLT activations" in the real model: state α subtracts ``(1 - α)`` of
every active occurrence's delta write from the MLP outputs -- the very intervention circuits are
evaluated with, so α = 0 is the "everything removed" null and α = 1 the clean run. With the
"right" rule (α = j/S) one step is the clean end, i.e. plain FAP. With the full gradient the
scores of a prompt sum to the Riemann sum of ``m_clean - m_null`` (IG completeness).
"""

from __future__ import annotations

from typing import cast

import torch

from pie_lib.engine.attribution import PathGradient, PathRule, path_alphas, path_mlp_out_gradients
from pie_lib.prune.beyond.config import IgConfig
from pie_lib.prune.context import BatchContext
from pie_lib.prune.scores import project_gradients


def fap_ig_scores(ctx: BatchContext, cfg: IgConfig, mode: PathGradient | None = None) -> torch.Tensor:
    """``[N]`` FAP-IG scores of the batch's occurrences (cached on the context per settings)."""
    mode = mode or ctx.cfg.gradient
    alphas = path_alphas(cfg.steps, cast(PathRule, cfg.rule))  # validates steps and rule before any forward

    def compute() -> torch.Tensor:
        b = ctx.batch
        pg = path_mlp_out_gradients(
            ctx.model,
            b.clean_ids,
            ctx.evaluator.null_offsets(),
            b.correct,
            b.wrong,
            alphas,
            ctx.cfg.metric,
            mode,
            max_rows=cfg.max_rows or None,
        )
        return ctx.occ.delta(ctx.cfg.corruption).cpu().float() * project_gradients(pg.mean, ctx.rows, ctx.occ)

    return ctx.cached(f"fap-ig:{mode}:{cfg.steps}:{cfg.rule}", compute)


__all__ = ["fap_ig_scores"]
