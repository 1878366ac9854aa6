"""greedy-refine: exact, batched swap search on top of a method's K-circuit.

Start from a method's selection (FAP-Synergy by default). Each round, for every prompt still
improving, try every swap of one of its ``n_in`` weakest kept occurrences (by the start method's
|score|) for one of its ``n_out`` strongest left-out ones, measuring the swapped circuit's exact
last-token KL in the real model; take the best swap if it lowers KL by more than ``min_gain``,
else the prompt stops. All swaps of all prompts of a round run as one batched set of forwards: the
current circuits' offsets (everything removed but the kept) are a shared base, and a swap adds the
removed occurrence's write and takes back the added one's (weights +1 / -1), by linearity of the
offsets. An occurrence swapped in is not swapped out again and vice versa, so every round looks at
new boundary candidates. ``max_forwards`` bounds the patched forwards per prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pie_lib.errors import BudgetError
from pie_lib.prune.beyond.config import RefineConfig
from pie_lib.prune.context import BatchContext
from pie_lib.prune.patching import Variants
from pie_lib.prune.select import rank_within


@dataclass
class RefineTrace:
    """What the refinement did, per prompt ``[B]``: patched forwards spent, swaps taken, KL of the
    start circuit and of the refined one; ``rounds`` = rounds run for the batch."""

    n_forwards: torch.Tensor
    n_swaps: torch.Tensor
    kl_start: torch.Tensor
    kl_end: torch.Tensor
    rounds: int


def _check(cfg: RefineConfig) -> None:
    for name in ("n_in", "n_out"):
        v = getattr(cfg, name)
        if v < 1:
            raise BudgetError(f"refine_{name}={v}: must be a positive integer")
    if cfg.max_forwards < 1:
        raise BudgetError(f"refine_max_forwards={cfg.max_forwards}: must be a positive integer")
    if not cfg.min_gain >= 0:
        raise BudgetError(f"refine_min_gain={cfg.min_gain}: must be >= 0")


def _candidates(prompt: torch.Tensor, eligible: torch.Tensor, key: torch.Tensor, width: int, n_prompts: int) -> torch.Tensor:
    """``[B, width]`` the best ``width`` eligible occurrences of each prompt by descending ``key`` (-1 = none)."""
    neg_inf = torch.tensor(float("-inf"))
    _, rank = rank_within(prompt, torch.where(eligible, key, neg_inf))
    take = eligible & (rank < width)
    out = torch.full((n_prompts, width), -1, dtype=torch.long)
    idx = take.nonzero().squeeze(-1)
    out[prompt[idx], rank[idx]] = idx
    return out


def refine_circuits(ctx: BatchContext, keep0: torch.Tensor, scores0: torch.Tensor, cfg: RefineConfig
                    ) -> tuple[torch.Tensor, RefineTrace]:
    """Refine the keep mask ``keep0`` ``[N]`` by exact swaps; boundary order from ``|scores0|`` ``[N]``.

    Returns:
        (refined keep mask ``[N]``, :class:`RefineTrace`). Every prompt keeps as many occurrences
        as it started with, and its KL never increases.
    """
    _check(cfg)
    occ, ev = ctx.occ, ctx.evaluator
    B = occ.n_prompts
    prompt = occ.prompt.cpu()
    key = scores0.abs().cpu().float()
    keep = keep0.clone().cpu()
    n_kept = torch.bincount(prompt[keep], minlength=B)
    tabu_in = torch.zeros(len(occ), dtype=torch.bool)   # swapped in: never removed again
    tabu_out = torch.zeros(len(occ), dtype=torch.bool)  # swapped out: never added again
    empty = torch.zeros(0, dtype=torch.long)

    def base_offsets() -> torch.Tensor:
        """``[L, B, T, D]`` offsets of the current circuits: every active occurrence removed but the kept."""
        kept = keep.nonzero().squeeze(-1)
        return ev.null_offsets() - ev._offsets(prompt[kept], kept, None, B)

    base = base_offsets()
    cur = ev.run(Variants(torch.arange(B), empty, empty, torch.zeros(B, dtype=torch.bool)), extra_offsets=base).kl
    kl_start = cur.clone()
    used = torch.ones(B, dtype=torch.long)
    swaps = torch.zeros(B, dtype=torch.long)
    active = (n_kept > 0) & (n_kept < occ.counts().cpu())
    rounds = 0
    while True:
        ins = _candidates(prompt, keep & ~tabu_in & active[prompt], -key, cfg.n_in, B)      # weakest kept
        outs = _candidates(prompt, ~keep & ~tabu_out & active[prompt], key, cfg.n_out, B)  # strongest left out
        valid = (ins[:, :, None] >= 0) & (outs[:, None, :] >= 0)  # [B, n_in, n_out]
        n_pairs = valid.flatten(1).sum(1)
        active &= (n_pairs > 0) & (used + n_pairs <= cfg.max_forwards)
        valid &= active[:, None, None]
        if not bool(valid.any()):
            break
        rounds += 1
        b_v, i_v, o_v = valid.nonzero(as_tuple=True)
        rem, add = ins[b_v, i_v], outs[b_v, o_v]
        V = b_v.numel()
        variants = Variants(prompt=b_v, var=torch.arange(V).repeat_interleave(2), occ=torch.stack([rem, add], 1).flatten(),
                            complement=torch.zeros(V, dtype=torch.bool),
                            weight=torch.tensor([1.0, -1.0]).repeat(V))
        kl = ev.run(variants, extra_offsets=base).kl
        used += torch.bincount(b_v, minlength=B)
        _, r = rank_within(b_v, -kl)  # rank 0 = the prompt's lowest KL (ties: first tried)
        best = (r == 0).nonzero().squeeze(-1)
        gain = cur[b_v[best]] - kl[best]
        take = best[gain > cfg.min_gain]
        active[b_v[best[gain <= cfg.min_gain]]] = False
        if take.numel() == 0:
            break
        keep[rem[take]] = False
        keep[add[take]] = True
        tabu_in[add[take]] = True
        tabu_out[rem[take]] = True
        cur[b_v[take]] = kl[take]
        swaps[b_v[take]] += 1
        base = base_offsets()
    return keep, RefineTrace(used, swaps, kl_start, cur, rounds)


__all__ = ["RefineTrace", "refine_circuits"]
