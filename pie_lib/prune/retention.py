"""Evaluate kept sets in the real model: KL, prediction change, faithfulness, completeness (spec §3)."""

from __future__ import annotations

import torch

from pie_lib.prune.context import BatchContext
from pie_lib.prune.patching import Variants


def faithfulness(m_circuit: torch.Tensor, m_null: torch.Tensor, m_clean: torch.Tensor) -> torch.Tensor:
    """``(m(circuit) - m(null)) / (m(clean) - m(null))``; NaN where clean and null coincide."""
    den = m_clean - m_null
    return torch.where(
        den.abs() > 1e-8,
        (m_circuit - m_null) / torch.where(den.abs() > 1e-8, den, torch.ones_like(den)),
        torch.full_like(den, float("nan")),
    )


def evaluate_keep_masks(ctx: BatchContext, keeps: torch.Tensor) -> dict[str, torch.Tensor]:
    """Evaluate J keep masks over the batch's occurrences, every prompt and variant batched.

    For each mask j and prompt b three quantities need forwards: the circuit (all active removed
    except the kept), its complement (only the kept removed) and, once per prompt, the null (all
    removed). The nulls run first and their forwards are kept: a circuit removes what the null does
    before its first kept occurrence, so it starts there from the null's keys and values. The
    circuits and complements then run as one stack of variants.

    Args:
        keeps: ``[J, N]`` bool keep masks.
    Returns:
        dict of ``[J, B]`` tensors: kl, pred_change, faithfulness, completeness, m_circuit,
        m_complement, n_kept; and ``[B]``: m_clean, m_null, kl_null, n_active.
    """
    occ = ctx.occ
    J, B = keeps.shape[0], occ.n_prompts
    prompt = occ.prompt.cpu()
    j_idx, o_idx = keeps.nonzero(as_tuple=True)
    var = j_idx * B + prompt[o_idx]
    prompts_jb = torch.arange(B).repeat(J)
    null = Variants(
        torch.arange(B),
        torch.zeros(0, dtype=torch.long),
        torch.zeros(0, dtype=torch.long),
        torch.ones(B, dtype=torch.bool),
    )
    ev = ctx.evaluator
    res_null = ev.run(null, retain=True)
    parent = res_null.state[prompts_jb] if res_null.state is not None else None
    circuit = Variants(prompts_jb, var, o_idx, torch.ones(J * B, dtype=torch.bool), parent=parent)
    complement = Variants(prompts_jb, var, o_idx, torch.zeros(J * B, dtype=torch.bool))
    try:
        res = ev.run(Variants.concat([circuit, complement]))
    finally:
        ev.release_states()
    m_clean = ev.clean_metric()
    m_circ = res.metric[: J * B].view(J, B).clone()
    m_comp = res.metric[J * B : 2 * J * B].view(J, B).clone()
    m_null = res_null.metric.clone()
    kl, kl_null = res.kl[: J * B].view(J, B).clone(), res_null.kl.clone()
    change = res.pred_change[: J * B].view(J, B).clone()
    # a prompt with no active occurrence removes nothing in any variant: each is the clean run by
    # definition (its forwards differ from the clean one only by the rounding of another batch size)
    idle = occ.counts().cpu() == 0
    if idle.any():
        mc = m_clean.to(m_null)
        m_null[idle], kl_null[idle] = mc[idle], 0.0
        m_circ[:, idle], m_comp[:, idle] = mc[idle], mc[idle]
        kl[:, idle], change[:, idle] = 0.0, False
    return {
        "kl": kl,
        "pred_change": change,
        "faithfulness": faithfulness(m_circ, m_null[None], m_clean[None]),
        "completeness": faithfulness(m_comp, m_null[None], m_clean[None]),
        "m_circuit": m_circ,
        "m_complement": m_comp,
        "n_kept": torch.bincount(var, minlength=J * B).view(J, B),
        "m_clean": m_clean,
        "m_null": m_null,
        "kl_null": kl_null,
        "n_active": occ.counts().cpu(),
    }
