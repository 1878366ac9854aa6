"""Value-preserving gradient rewrites, written as plain torch so they also run on NDIF.

Each function returns a tensor whose *value* equals the module's real output and whose
*gradient* follows a rule: the "straight-through" form ``y.detach() + (r - r.detach())`` keeps
the forward exact while the backward is that of ``r``. No custom autograd Function is used,
because code sent to a remote nnsight backend may only use torch.
"""

from __future__ import annotations

import torch

from pie_lib.models.arch import NormKind


def frozen_norm(
    kind: NormKind, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None, eps: float
) -> torch.Tensor:
    """The norm output ``y`` with its scale frozen: dy/dx = w * s (RMS) or w * s * centre (LayerNorm).

    Args:
        kind: "rms" (Llama: y = w x s), "rms_offset" (Gemma: y = (1 + w) x s), "layernorm" (GPT-2).
        x: ``[..., D]`` norm input; y: ``[..., D]`` its real output; weight: ``[D]``.
    Returns:
        ``[..., D]``, equal to ``y``, gradient with s = 1/rms(x) (or 1/std(x)) held constant.
    """
    xf = x.float()
    dx = xf - xf.detach()  # zero in value, carries the gradient
    if kind == "layernorm":
        s = torch.rsqrt(xf.detach().var(-1, keepdim=True, unbiased=False) + eps)
        lin = (dx - dx.mean(-1, keepdim=True)) * s
    else:
        s = torch.rsqrt(xf.detach().pow(2).mean(-1, keepdim=True) + eps)
        lin = dx * s
    if weight is not None:
        w = weight.float() + (1.0 if kind == "rms_offset" else 0.0)
        lin = lin * w
    return y.detach() + lin.to(y.dtype)


def detach_leading(y: torch.Tensor, fraction: tuple[int, int]) -> torch.Tensor:
    """Detach the leading ``num/den`` share of the last dim (the Q/K part of a fused projection)."""
    num, den = fraction
    if num == den:
        return y.detach()
    cut = y.shape[-1] * num // den
    return torch.cat([y[..., :cut].detach(), y[..., cut:]], dim=-1)


def identity_rule(z: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
    """LRP identity rule on an activation function: value act(z), gradient act(z) / z (0 at z = 0)."""
    ratio = torch.where(z != 0, act / torch.where(z != 0, z, torch.ones_like(z)), torch.zeros_like(z))
    return act.detach() + (z - z.detach()) * ratio.detach()


def half_rule(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """LRP half rule on a gated product: value a * b, relevance split equally between a and b."""
    return 0.5 * (a * b.detach() + a.detach() * b)


def subtract_rows(h: torch.Tensor, idx: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``h`` ``[..., D]`` less ``rows`` ``[R, D]`` at its flat rows ``idx`` ``[R]`` (distinct), unchanged elsewhere.

    Bitwise ``h - dense`` for the dense offsets that hold ``rows`` at those rows and zeros elsewhere:
    each written row gets the same IEEE subtraction (``a + (-1) b`` is ``a - b``), and ``x - 0.0`` is
    ``x`` (signed zeros included). A patch forward subtracts sparse offsets with it (single and pair
    removals touch 1-2 rows per layer). A contiguous ``h`` is written in place (a module output the
    forward owns: no copy of the whole activation); any other is copied first.
    """
    if idx.numel() == 0:
        return h
    flat = h.view(-1, h.shape[-1]) if h.is_contiguous() else h.reshape(-1, h.shape[-1])  # [N, D]
    flat.index_add_(0, idx.to(h.device), rows.to(h.device, h.dtype), alpha=-1)
    return flat.view(h.shape)
