"""FAP-iterative: re-attribute at the partially pruned point, in a budgeted number of rounds.

Round 1 scores every active occurrence with FAP at the clean run. Each later round recomputes
the gradient at the state where everything pruned so far is removed (the real forward with their
delta writes subtracted -- how circuits are evaluated), rescores the survivors there and keeps the
best of them by |score|. The survivors of round r number ``ceil(K (n/K)^((R-r)/R))`` (a fixed
share removed per round), so round R ends at exactly ``min(K, n)``. One batched gradient pass per
round serves every prompt of the batch.
"""

from __future__ import annotations

import torch

from pie_lib.engine.attribution import patched_mlp_out_gradients
from pie_lib.errors import BudgetError
from pie_lib.prune.beyond.config import IterativeConfig
from pie_lib.prune.context import BatchContext
from pie_lib.prune.scores import project_gradients
from pie_lib.prune.select import Budget, budget_per_prompt, rank_within


def survivors(n: torch.Tensor, k: torch.Tensor, rounds: int) -> torch.Tensor:
    """``[R, B]`` occurrences kept after each round (geometric from n to min(k, n)); the last row is min(k, n)."""
    target = torch.minimum(n, k).double()
    r = torch.arange(1, rounds + 1, dtype=torch.float64)[:, None]
    ratio = (n.double() / target.clamp_min(1)).clamp_min(1.0)
    keep = torch.ceil(target[None] * ratio[None] ** ((rounds - r) / rounds) - 1e-9).long()
    keep = torch.minimum(keep, n[None].long())
    keep[-1] = target.long()
    return keep


def iterative_select(ctx: BatchContext, k: Budget, cfg: IterativeConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep mask ``[N]`` and scores ``[N]`` (each occurrence's score in the last round it was scored)."""
    if isinstance(cfg.rounds, bool) or cfg.rounds < 1:
        raise BudgetError(f"iter_rounds={cfg.rounds}: the number of rounds must be a positive integer")
    occ, b = ctx.occ, ctx.batch
    kv = budget_per_prompt(k, occ.n_prompts)
    prompt = occ.prompt.cpu()
    delta = occ.delta(ctx.cfg.corruption).cpu().float()
    plan = survivors(occ.counts().cpu(), kv, cfg.rounds)
    keep = torch.ones(len(occ), dtype=torch.bool)
    scores = torch.zeros(len(occ))
    neg_inf = torch.tensor(float("-inf"))
    for r in range(cfg.rounds):
        if r == 0:
            grads = ctx.grads(ctx.cfg.gradient)  # the clean gradient, shared with FAP
        else:
            removed = (~keep).nonzero().squeeze(-1)
            off = ctx.evaluator.offsets(prompt[removed], removed, None, occ.n_prompts)
            grads, _ = patched_mlp_out_gradients(
                ctx.model, b.clean_ids, off, b.correct, b.wrong, ctx.cfg.metric, ctx.cfg.gradient
            )
        s = delta * project_gradients(grads, ctx.rows, occ)
        scores = torch.where(keep, s, scores)
        _, rank = rank_within(prompt, torch.where(keep, s.abs(), neg_inf))
        keep = keep & (rank < plan[r][prompt])
    return keep, scores


__all__ = ["iterative_select", "survivors"]
