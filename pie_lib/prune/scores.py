"""Per-occurrence scores: FAP, CLT-RelP, Activation-Magnitude, FActP, Random (spec §2, §6).

Every function scores all occurrences of a batch at once and returns ``[N]`` aligned with
:class:`~pie_lib.prune.occurrences.Occurrences`. No Python loop runs over occurrences or prompts;
the only loop is over source layers (one matmul each).
"""

from __future__ import annotations

import torch

from pie_lib.prune.occurrences import Corruption, Occurrences
from pie_lib.prune.patching import LayerRows, PatchEvaluator, Variants


def project_gradients(grads: torch.Tensor, rows: list[LayerRows | None], occ: Occurrences) -> torch.Tensor:
    """``<W_dec[l][i, s-l], g_s(t)>`` summed over targets s, per occurrence.

    Args:
        grads: ``[L, B, T, D]`` gradient (or relevance) at every MLP output.
        rows: decoder rows per layer for this batch.
    Returns:
        ``[N]`` projected gradient of each occurrence (multiply by Δa for the score).
    """
    out = torch.zeros(len(occ), dtype=torch.float32)
    for layer, lr in enumerate(rows):
        if lr is None:
            continue
        n_out = lr.rows.shape[1]
        g = grads[layer : layer + n_out].to(lr.rows.device, lr.rows.dtype)  # [S, B, T, D]
        # one matmul over the batch's features of this layer, then a gather: [B, T, U]
        proj = torch.einsum("sbtd,usd->btu", g, lr.rows)
        b = occ.prompt[lr.occ_idx].to(proj.device)
        t = occ.pos[lr.occ_idx].to(proj.device)
        out[lr.occ_idx] = proj[b, t, lr.occ_u].float().cpu()
    return out


def fap_scores(
    occ: Occurrences, grads: torch.Tensor, rows: list[LayerRows | None], corruption: Corruption = "corrupted"
) -> torch.Tensor:
    """FAP: ``S(l,t,i) = sum_{s>=l} <Δa · W_dec[l][i, s-l], g_s(t)> = Δa · <sum_s W_dec g_s>``.

    With ``grads`` from the replacement gradient this is the paper's FAP; with the full gradient,
    FAP(full); with RelP relevances, CLT-RelP.
    """
    return occ.delta(corruption).cpu().float() * project_gradients(grads, rows, occ)


def activation_magnitude(occ: Occurrences, kind: str = "clean") -> torch.Tensor:
    """Activation-Magnitude baseline: ``|a_clean|`` (kind="clean") or ``|Δa|`` (kind="delta")."""
    if kind == "clean":
        return occ.a_clean.abs().cpu().float()
    if kind == "delta":
        return (occ.a_clean - occ.a_corr).abs().cpu().float()
    raise ValueError(f"activation-magnitude kind {kind!r}; use 'clean' or 'delta'")


def _mix64(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64 finaliser on int64 (wrapping arithmetic): a fast, well-mixed integer hash."""
    x = x ^ (x >> 30) & 0x3FFFFFFFF  # logical shifts emulated by masking the sign-extended bits
    x = x * -4658895280553007687  # 0xbf58476d1ce4e5b9 as signed int64
    x = x ^ (x >> 27) & 0x1FFFFFFFFF
    x = x * -7723592293110705685  # 0x94d049bb133111eb
    x = x ^ (x >> 31) & 0x1FFFFFFFF
    return x


def hash_uniform(seed: int, *keys: torch.Tensor) -> torch.Tensor:
    """Deterministic U(0, 1) per element from integer keys and a seed.

    Independent of batching and order: the same (seed, prompt, layer, pos, feat) always draws the
    same number, so Random selections do not change when prompts are batched differently.
    """
    h = torch.full_like(keys[0], seed, dtype=torch.int64)
    for k in keys:
        h = _mix64(h * 1000003 + k.to(torch.int64) + 0x9E3779B9)
    return ((h >> 11) & ((1 << 53) - 1)).double() / float(1 << 53)


def random_scores(occ: Occurrences, prompt_idx: torch.Tensor, seed: int) -> torch.Tensor:
    """Random (active set): a seeded uniform score per occurrence; top-K of it is a uniform sample."""
    p = prompt_idx.to(occ.prompt.device)[occ.prompt]
    return hash_uniform(seed, p, occ.layer, occ.pos, occ.feat).float().cpu()


def factp_scores(evaluator: PatchEvaluator, chunk_prompts: bool = True) -> torch.Tensor:
    """FActP, our reading (the name is used but not defined publicly): the exact patching effect
    ``M({c}) = m_clean - m(c removed)`` of every active occurrence, from batched real forwards.
    """
    occ = evaluator.occ
    res = evaluator.run(Variants.singles(occ.prompt, torch.arange(len(occ))))
    return evaluator.clean_metric()[occ.prompt.cpu()] - res.metric
