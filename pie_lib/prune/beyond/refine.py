"""greedy-refine: exact, batched swap search on top of a method's K-circuit.

Start from a method's selection (FAP-Synergy by default). Each round, for every prompt still
improving, try every swap of one of its ``n_in`` weakest kept occurrences for one of its ``n_out``
strongest left-out ones, measuring the swapped circuit's exact last-token KL in the real model.
"Weakest" and "strongest" come, by default, from one gradient of the KL at the current circuits
(true gradient, every prompt in one pass): adding back occurrence o changes the MLP outputs by
its write, so ``ΔKL ≈ Δa_o <W_dec[o], ∂KL/∂mlp_out>``, and removing a kept one by minus that.
The candidates are only proposals: the swap taken is the one whose *exact* KL is lowest. Take it take the best swap if it lowers KL by more than ``min_gain``,
else the prompt stops. All swaps of all prompts of a round run as one batched set of forwards: the
current circuits' offsets (everything removed but the kept) are a shared base, and a swap adds the
removed occurrence's write and takes back the added one's (weights +1 / -1), by linearity of the
offsets. An occurrence swapped in is not swapped out again and vice versa, so every round looks at
new boundary candidates. ``max_forwards`` bounds the patched forwards per prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pie_lib.engine.attribution import patched_mlp_out_gradients
from pie_lib.errors import BudgetError
from pie_lib.prune.beyond.config import RefineConfig
from pie_lib.prune.context import BatchContext
from pie_lib.prune.patching import Variants
from pie_lib.prune.scores import project_gradients
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
    if cfg.rank_by not in ("kl-gradient", "start"):
        raise BudgetError(f"refine_rank_by={cfg.rank_by!r}; use 'kl-gradient' or 'start'")
    if not cfg.min_gain >= 0:
        raise BudgetError(f"refine_min_gain={cfg.min_gain}: must be >= 0")


def _candidates(
    prompt: torch.Tensor, eligible: torch.Tensor, key: torch.Tensor, width: int, n_prompts: int
) -> torch.Tensor:
    """``[B, width]`` the best ``width`` eligible occurrences of each prompt by descending ``key`` (-1 = none)."""
    neg_inf = torch.tensor(float("-inf"))
    _, rank = rank_within(prompt, torch.where(eligible, key, neg_inf))
    take = eligible & (rank < width)
    out = torch.full((n_prompts, width), -1, dtype=torch.long)
    idx = take.nonzero().squeeze(-1)
    out[prompt[idx], rank[idx]] = idx
    return out


def refine_circuits(
    ctx: BatchContext, keep0: torch.Tensor, scores0: torch.Tensor, cfg: RefineConfig
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
    tabu_in = torch.zeros(len(occ), dtype=torch.bool)  # swapped in: never removed again
    tabu_out = torch.zeros(len(occ), dtype=torch.bool)  # swapped out: never added again
    empty = torch.zeros(0, dtype=torch.long)

    def base_offsets() -> torch.Tensor:
        """``[L, B, T, D]`` offsets of the current circuits: every active occurrence removed but the kept."""
        kept = keep.nonzero().squeeze(-1)
        return ev.null_offsets() - ev.offsets(prompt[kept], kept, None, B)

    base = base_offsets()
    cur = ev.run(Variants(torch.arange(B), empty, empty, torch.zeros(B, dtype=torch.bool)), extra_offsets=base).kl
    kl_start = cur.clone()
    used = torch.ones(B, dtype=torch.long)
    swaps = torch.zeros(B, dtype=torch.long)
    active = (n_kept > 0) & (n_kept < occ.counts().cpu())
    rounds = 0
    delta = occ.delta(ctx.cfg.corruption).cpu().float()
    grad_cost = 1 if cfg.rank_by == "kl-gradient" else 0
    while True:
        # a round runs only where all of it fits under the bound
        active &= used + grad_cost + cfg.n_in * cfg.n_out <= cfg.max_forwards
        if not bool(active.any()):
            break
        if grad_cost:
            rows = active.nonzero().squeeze(-1)  # only the prompts still improving
            dev_rows = rows.to(base.device)
            g_act, _ = patched_mlp_out_gradients(
                ctx.model,
                ctx.batch.clean_ids[rows],
                base[:, dev_rows],
                ctx.batch.correct[rows],
                ctx.batch.wrong[rows],
                "kl",
                "full",
                clean_logits=ev.clean_logits[rows.to(ev.clean_logits.device)],
            )
            g = torch.zeros(g_act.shape[0], B, *g_act.shape[2:], dtype=g_act.dtype, device=g_act.device)
            g[:, rows.to(g.device)] = g_act
            d_add = delta * project_gradients(g, ctx.rows, occ)  # first-order KL change of adding back
            used += active.long()
            in_key, out_key = d_add, -d_add  # remove those whose removal raises KL least; add the most helpful
        else:
            in_key, out_key = -key, key
        ins = _candidates(prompt, keep & ~tabu_in & active[prompt], in_key, cfg.n_in, B)  # weakest kept
        outs = _candidates(prompt, ~keep & ~tabu_out & active[prompt], out_key, cfg.n_out, B)  # strongest left out
        valid = (ins[:, :, None] >= 0) & (outs[:, None, :] >= 0)  # [B, n_in, n_out]
        active &= valid.flatten(1).any(1)
        valid &= active[:, None, None]
        if not bool(valid.any()):
            break
        rounds += 1
        b_v, i_v, o_v = valid.nonzero(as_tuple=True)
        rem, add = ins[b_v, i_v], outs[b_v, o_v]
        V = b_v.numel()
        variants = Variants(
            prompt=b_v,
            var=torch.arange(V).repeat_interleave(2),
            occ=torch.stack([rem, add], 1).flatten(),
            complement=torch.zeros(V, dtype=torch.bool),
            weight=torch.tensor([1.0, -1.0]).repeat(V),
        )
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
