"""Per-prompt rankings with lexicographic keys, budgeted top-K, and normalised ranks.

Like :func:`pie_lib.prune.select.rank_within`, every ranking is stable: remaining ties keep
occurrence order (layer, position, feature), so selections are deterministic.
"""

from __future__ import annotations

import torch

from pie_lib.prune.occurrences import Occurrences
from pie_lib.prune.select import Budget, budget_per_prompt, rank_within


def lex_rank_within(groups: torch.Tensor, keys: list[torch.Tensor]) -> torch.Tensor:
    """Rank ``[N]`` (0 = best) of every element inside its group, by ``keys`` descending,
    most significant key first; ties beyond the last key keep index order."""
    return rank_within(groups, list(keys))[1]


def topk_lex(occ: Occurrences, keys: list[torch.Tensor], k: Budget) -> torch.Tensor:
    """Keep mask ``[N]``: the first ``min(K_b, n_b)`` occurrences of each prompt in ``keys`` order."""
    kv = budget_per_prompt(k, occ.n_prompts)
    prompt = occ.prompt.cpu()
    return lex_rank_within(prompt, [x.cpu() for x in keys]) < kv[prompt]


def normalised_rank(occ: Occurrences, keys: list[torch.Tensor]) -> torch.Tensor:
    """Rank within each prompt mapped to [0, 1]: ``1 - rank / (n_b - 1)`` (1 = best; 1 when n_b = 1)."""
    prompt = occ.prompt.cpu()
    rank = lex_rank_within(prompt, [x.cpu() for x in keys]).double()
    n = occ.counts().cpu().double()[prompt]
    return torch.where(n > 1, 1.0 - rank / (n - 1).clamp_min(1), torch.ones_like(rank)).float()


__all__ = ["lex_rank_within", "normalised_rank", "topk_lex"]
