"""Learned hard-concrete masks over CLT occurrences: Edge Pruning adapted to PIE (spec §10).

A mask value ``z ∈ [0, 1]`` per *unit* gates occurrences. A unit is one occurrence
(per-prompt masks) or a group of occurrences sharing one z (a (layer, feature) pair shared by
every prompt and position of a batch). An occurrence with mask z keeps ``z`` of its clean write;
the rest, ``(1 - z) · Δ``, is removed, so a fully removed occurrence takes its corrupted write
(spec §3). The masked forward is the real model with

    offset_s(b, t) = Σ_{occ of prompt b at t, source l <= s} (1 - z_occ) · Δa_occ · W_dec[l][i, s-l]

subtracted from every MLP output s, differentiable in z (:class:`DeltaWriter`,
:func:`masked_last_logits`).

Objective (Bhaskar et al., 2024), per prompt b::

    KL(P_full || P_masked)(last token) + λ1_b (s_b - t_b) + λ2_b (s_b - t_b)^2

with ``s_b`` the expected density (mean over b's trained occurrences of ``P(z > 0)``) and ``t_b``
ramped linearly from 1 to the final density ``K_b / n_b`` over ``warmup`` steps. log_alpha is
minimised (Adam), λ1, λ2 are maximised (Adam, gradient *ascent*). Prompts do not interact (the
loss is a sum), so one batch trains B independent problems at once (the shared mask couples them).

Every call of :func:`learn_masks` appends a :class:`MaskTiming` to :data:`TIMINGS` (wall time of
the optimisation loop only); :func:`mask_timings` returns them as a DataFrame.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

import torch

from pie_lib.engine.masked import last_token_kl, masked_last_logits
from pie_lib.models.loading import LoadedModel
from pie_lib.prune.context import BatchContext
from pie_lib.prune.patching import layer_entries
from pie_lib.prune.related.config import MaskConfig


# ----------------------------------------------------------------------------- hard concrete
@dataclass(frozen=True)
class HardConcrete:
    """The stretched, clamped binary-concrete distribution of Louizos et al. (2018).

    ``s = sigmoid((log u - log(1 - u) + log_alpha) / beta)``, ``z = clamp(s · (zeta - gamma) + gamma, 0, 1)``.
    """

    beta: float = 2.0 / 3.0
    gamma: float = -0.1
    zeta: float = 1.1

    def sample(self, log_alpha: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """``[P]`` mask sample from uniforms ``u`` in (0, 1) (reparameterised: grad w.r.t. log_alpha)."""
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / self.beta)
        return (s * (self.zeta - self.gamma) + self.gamma).clamp(0.0, 1.0)

    def p_open(self, log_alpha: torch.Tensor) -> torch.Tensor:
        """``P(z > 0) = sigmoid(log_alpha - beta · log(-gamma / zeta))`` (the L0 surrogate)."""
        return torch.sigmoid(log_alpha - self.beta * torch.log(torch.tensor(-self.gamma / self.zeta)))

    def deterministic(self, log_alpha: torch.Tensor) -> torch.Tensor:
        """Test-time mask ``clamp(sigmoid(log_alpha) · (zeta - gamma) + gamma, 0, 1)``."""
        return (torch.sigmoid(log_alpha) * (self.zeta - self.gamma) + self.gamma).clamp(0.0, 1.0)


# ----------------------------------------------------------------------------- differentiable patching
class DeltaWriter:
    """Summed delta writes ``[L, B, T, D]`` of a fixed set of occurrences with per-occurrence
    coefficients, differentiable w.r.t. the coefficients (``PatchEvaluator.offsets`` with one
    variant per prompt; both find their decoder rows with :func:`~pie_lib.prune.patching.layer_entries`).

    Args:
        ctx: the batch context (its occurrences and decoder rows).
        occ_idx: ``[n]`` batch occurrences covered (any order).
    """

    def __init__(self, ctx: BatchContext, occ_idx: torch.Tensor) -> None:
        occ = ctx.occ
        self.L, self.B, self.T = ctx.clt.n_layers, occ.n_prompts, ctx.batch.seq_len
        self.D = ctx.clt.d_model
        self.device = ctx.model.device
        self.n = occ_idx.numel()
        occ_idx = occ_idx.cpu()
        self.parts: list[tuple[int, torch.Tensor, torch.Tensor, int, torch.Tensor]] = []
        for layer, sel, u, lr in layer_entries(ctx.rows, occ.layer.cpu(), occ_idx):
            u = u.cpu()
            U = lr.feats.numel()
            flat = (occ.prompt.cpu()[occ_idx[sel]] * self.T + occ.pos.cpu()[occ_idx[sel]]) * U + u
            self.parts.append((layer, sel, flat, U, lr.rows))

    def __call__(self, coef: torch.Tensor) -> torch.Tensor:
        """``coef`` ``[n]`` (e.g. ``(1 - z) · Δa``) -> offsets ``[L, B, T, D]`` to subtract."""
        outs: list[torch.Tensor | int] = [0] * self.L
        for layer, sel, flat, U, rows in self.parts:
            c = coef[sel.to(coef.device)].to(rows)
            C = torch.zeros(self.B * self.T * U, device=rows.device, dtype=rows.dtype)
            C = C.index_add(0, flat.to(rows.device), c).view(self.B, self.T, U)
            w = torch.einsum("btu,usd->sbtd", C, rows)
            for j in range(rows.shape[1]):
                outs[layer + j] = outs[layer + j] + w[j]
        zero = torch.zeros(self.B, self.T, self.D, device=self.device)
        return torch.stack([o.to(self.device, torch.float32) if torch.is_tensor(o) else zero for o in outs])


@contextlib.contextmanager
def frozen_parameters(model: LoadedModel) -> Iterator[None]:
    """Turn off ``requires_grad`` of every model parameter (restored on exit): the mask backward
    then never computes, nor accumulates, weight gradients."""
    params = [p for p in model.hf.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


# ----------------------------------------------------------------------------- training
@dataclass
class MaskTiming:
    """One mask optimisation: who ran it, over how many units, and its wall time (seconds)."""

    method: str
    prompt_idx: list[int]
    k: list[int]
    n_units: int
    n_train_occ: int
    n_fixed_removed: int
    steps: int
    seconds: float
    final_kl: float
    final_density: float


#: Every :func:`learn_masks` call appends here (read with :func:`mask_timings`).
TIMINGS: list[MaskTiming] = []


def mask_timings(method: str | None = None) -> Any:
    """The recorded mask optimisations as a DataFrame (optionally of one method)."""
    import pandas as pd

    df = pd.DataFrame([asdict(t) for t in TIMINGS], columns=list(MaskTiming.__dataclass_fields__))
    return df if method is None else df[df.method == method].reset_index(drop=True)


def clear_mask_timings() -> None:
    TIMINGS.clear()


@dataclass
class MaskResult:
    """Trained mask logits ``[P]`` and per-step history (lists, one entry per step).

    history keys: loss (total objective), kl (mean over trained prompts), objective (KL + penalty,
    mean), density, target (means over trained prompts), lambda1 (mean).
    """

    log_alpha: torch.Tensor
    history: dict[str, list[float]] = field(default_factory=dict)
    seconds: float = 0.0


def learn_masks(
    ctx: BatchContext,
    train_idx: torch.Tensor,
    unit_of: torch.Tensor,
    init_log_alpha: torch.Tensor,
    final_density: torch.Tensor,
    cfg: MaskConfig,
    seed: int = 0,
    fixed_removed: torch.Tensor | None = None,
    method: str = "edge-pruning",
    k: torch.Tensor | None = None,
) -> MaskResult:
    """Optimise hard-concrete masks over occurrences ``train_idx`` of one batch.

    Args:
        ctx: batch context (model, clean logits, occurrences, rows).
        train_idx: ``[n]`` occurrences whose mask is learned.
        unit_of: ``[n]`` mask unit of each trained occurrence (``arange(n)`` = one mask each).
        init_log_alpha: ``[P]`` initial logits (P units), e.g. ``N(10, 0.01)``.
        final_density: ``[B]`` target density per prompt at the end of warm-up (``K_b / n_b``);
            prompts with target >= 1 or no trained occurrence do not contribute to the loss.
        cfg: steps, lr, warm-up, λ lr, hard-concrete constants.
        seed: seeds the uniform noise of the samples.
        fixed_removed: occurrences held at z = 0 throughout (HAP: outside the prescreened pool).
        method, k: recorded in :data:`TIMINGS`.
    Returns:
        the trained ``log_alpha`` ``[P]`` (detached) and the history.
    """
    occ = ctx.occ
    B = occ.n_prompts
    dev = ctx.model.device
    hc = HardConcrete(cfg.beta, cfg.gamma, cfg.zeta)
    train_idx = train_idx.cpu()
    prompt_t = occ.prompt.cpu()[train_idx].to(dev)
    unit_of = unit_of.to(dev)
    delta = ctx.evaluator.delta.float().cpu()[train_idx].to(dev)
    count = torch.bincount(prompt_t, minlength=B).float()
    trained = (count > 0) & (final_density.to(dev).float() < 1.0)
    weight = trained.float()
    fixed = torch.zeros(0, dtype=torch.long) if fixed_removed is None else fixed_removed.cpu()
    base = ctx.evaluator.offsets(occ.prompt.cpu()[fixed], fixed, None, B).to(dev) if fixed.numel() else None
    writer = DeltaWriter(ctx, train_idx)
    clean = ctx.evaluator.clean_logits.to(dev).float()
    ids = ctx.batch.clean_ids

    log_alpha = init_log_alpha.detach().clone().float().to(dev).requires_grad_(True)
    lam1 = torch.zeros(B, device=dev, requires_grad=True)
    lam2 = torch.zeros(B, device=dev, requires_grad=True)
    opt = torch.optim.Adam([log_alpha], lr=cfg.lr)
    opt_lam = torch.optim.Adam([lam1, lam2], lr=cfg.lambda_lr, maximize=True)
    gen = torch.Generator(device="cpu").manual_seed(int(seed) * 7919 + 17)
    hist: dict[str, list[float]] = {k_: [] for k_ in ("loss", "kl", "objective", "density", "target", "lambda1")}
    n_tr = max(float(weight.sum()), 1.0)
    t0 = time.perf_counter()
    steps = cfg.steps if bool(trained.any()) and train_idx.numel() else 0
    with frozen_parameters(ctx.model):
        for step in range(steps):
            u = torch.rand(log_alpha.shape[0], generator=gen).clamp(1e-6, 1 - 1e-6).to(dev)
            z = hc.sample(log_alpha, u)[unit_of]
            off = writer((1.0 - z) * delta)
            if base is not None:
                off = off + base
            logits = masked_last_logits(ctx.model, ids, off)
            kl = last_token_kl(clean, logits, floor_at_zero=False)
            s = torch.zeros(B, device=dev).index_add(0, prompt_t, hc.p_open(log_alpha)[unit_of]) / count.clamp_min(1)
            ramp = min(1.0, (step + 1) / cfg.warmup) if cfg.warmup > 0 else 1.0
            t = 1.0 + (final_density.to(dev).float() - 1.0) * ramp
            gap = s - t
            pen = lam1 * gap + lam2 * gap**2
            loss = ((kl + pen) * weight).sum()
            g_alpha, g1, g2 = torch.autograd.grad(loss, [log_alpha, lam1, lam2])
            opt.zero_grad()
            opt_lam.zero_grad()
            log_alpha.grad, lam1.grad, lam2.grad = g_alpha, g1 * weight, g2 * weight
            opt.step()
            opt_lam.step()
            with torch.no_grad():
                hist["loss"].append(float(loss))
                hist["kl"].append(float((kl * weight).sum()) / n_tr)
                hist["objective"].append(float(((kl + pen) * weight).sum()) / n_tr)
                hist["density"].append(float((s * weight).sum()) / n_tr)
                hist["target"].append(float((t * weight).sum()) / n_tr)
                hist["lambda1"].append(float((lam1 * weight).sum()) / n_tr)
    seconds = time.perf_counter() - t0
    TIMINGS.append(
        MaskTiming(
            method=method,
            prompt_idx=ctx.batch.prompt_idx.tolist(),
            k=[] if k is None else [int(x) for x in k],
            n_units=int(log_alpha.shape[0]),
            n_train_occ=int(train_idx.numel()),
            n_fixed_removed=int(fixed.numel()),
            steps=steps,
            seconds=seconds,
            final_kl=hist["kl"][-1] if hist["kl"] else float("nan"),
            final_density=hist["density"][-1] if hist["density"] else float("nan"),
        )
    )
    return MaskResult(log_alpha.detach().cpu(), hist, seconds)


__all__ = [
    "DeltaWriter",
    "HardConcrete",
    "MaskResult",
    "MaskTiming",
    "TIMINGS",
    "clear_mask_timings",
    "frozen_parameters",
    "learn_masks",
    "mask_timings",
    "masked_last_logits",
]
