"""Train a JumpReLU cross-layer transcoder (CLT) on a toy model's activations.

The CLT reads ``hook_resid_mid`` (input of the pre-MLP norm) and writes ``hook_mlp_out`` (output
of the MLP) at every layer, at the places :mod:`pie_lib.models.arch` names. Activations are
collected with plain torch forward hooks; position 0 (``<bos>``) and padding are excluded.

Recipe (two phases, one loss):

1. ReLU features; loss = mean over layers of the FVU of the reconstruction + ``λ`` times the
   per-layer sum over features of ``tanh(c · a_i · ||W_dec_i||)`` (a smooth L0 that, unlike L1,
   barely shrinks large activations). ``λ`` ramps up linearly over the first part of training.
2. Each feature gets a threshold: ``threshold_frac`` times the median of its positive
   activations (dead features get a large one), and training continues with JumpReLU
   ``a = pre · 1[pre > θ]`` and those fixed thresholds, so the encoder adapts to them.

Inputs and outputs are normalised per layer during training (mean squared norm = D); the scales
are folded back into the weights on export, so the saved CLT acts on raw activations (thresholds
are in pre-activation units, which the folding leaves unchanged).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, cast

import torch
from torch import nn
from transformers import PreTrainedModel

from pie_lib.clt import fvu, mean_l0, save_clt
from pie_lib.models.arch import arch_for, get_path


@dataclass
class CLTTrainConfig:
    """CLT width, sparsity and schedule (fields double as ``build`` CLI defaults)."""

    n_features: int = 512
    steps: int = 1000
    batch_tokens: int = 512
    lr: float = 2e-3
    sparsity_coef: float = 1.5e-3  # λ
    tanh_scale: float = 4.0  # c
    sparsity_warmup_frac: float = 0.3
    jumprelu_frac: float = 0.25  # share of steps trained with fixed JumpReLU thresholds
    threshold_frac: float = 0.25
    n_train_texts: int = 2000
    seed: int = 0


# --------------------------------------------------------------------------- activations
@torch.no_grad()
def collect_activations(
    model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run ``model`` and capture every layer's ``hook_resid_mid`` and ``hook_mlp_out``.

    Args:
        input_ids, attention_mask: ``[B, T]``.
    Returns:
        ``(resid_mid [L, B, T, D], mlp_out [L, B, T, D], logits [B, T, V])``.
    """
    spec = arch_for(model)
    layers = get_path(model, spec.layers)
    reads: list[torch.Tensor] = []
    writes: list[torch.Tensor] = []
    handles = []

    def read(m: nn.Module, i: tuple, o: Any) -> None:
        reads.append(i[0])

    def write(m: nn.Module, i: tuple, o: Any) -> None:
        writes.append(o)

    for layer in layers:  # type: ignore[attr-defined]
        resid_mid, mlp_out = (cast(nn.Module, get_path(layer, p)) for p in (spec.resid_mid, spec.mlp_out))
        handles.append(resid_mid.register_forward_hook(read))
        handles.append(mlp_out.register_forward_hook(write))
    try:
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    finally:
        for h in handles:
            h.remove()
    return torch.stack(reads), torch.stack(writes), logits


@torch.no_grad()
def corpus_activations(
    model: PreTrainedModel, tokenizer: Any, texts: Sequence[str], batch_size: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """CLT inputs/targets over ``texts`` (each ``<bos>``-prefixed), real tokens only, BOS excluded.

    Returns:
        ``(resid_mid [L, N, D], mlp_out [L, N, D])`` with N the number of kept tokens.
    """
    xs, ys = [], []
    for i in range(0, len(texts), batch_size):
        batch = tokenizer(list(texts[i : i + batch_size]), return_tensors="pt", padding=True)
        x, y, _ = collect_activations(model, batch["input_ids"], batch["attention_mask"])
        keep = batch["attention_mask"].bool().clone()
        keep[:, 0] = False  # BOS: its activations are off-distribution and PIE zeroes them anyway
        xs.append(x[:, keep])
        ys.append(y[:, keep])
    return torch.cat(xs, 1), torch.cat(ys, 1)


# --------------------------------------------------------------------------- the trainable CLT
class TrainableCLT(nn.Module):
    """A CLT in normalised space. ``W_dec[l]`` is ``[F, L - l, D]``: source l writes to s >= l."""

    threshold: torch.Tensor  # [L, F] buffer (declared for the type checker: buffers type as Tensor | Module)

    def __init__(self, n_layers: int, d_model: int, n_features: int, y_mean: torch.Tensor) -> None:
        super().__init__()
        L, D, F = n_layers, d_model, n_features
        self.W_enc = nn.Parameter(torch.randn(L, F, D) / D**0.5)
        self.b_enc = nn.Parameter(torch.zeros(L, F))
        self.W_dec = nn.ParameterList([nn.Parameter(torch.randn(F, L - l, D) / (F * (L - l)) ** 0.5) for l in range(L)])
        self.b_dec = nn.Parameter(y_mean.clone())  # [L, D]
        self.register_buffer("threshold", torch.zeros(L, F))
        self.jumprelu = False

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [L, N, D]`` -> ``(pre, acts)``, both ``[L, N, F]``."""
        pre = torch.baddbmm(self.b_enc[:, None, :], x, self.W_enc.transpose(1, 2))
        if self.jumprelu:
            return pre, pre * (pre > self.threshold[:, None, :])
        return pre, torch.relu(pre)

    def decode(self, acts: torch.Tensor) -> torch.Tensor:
        """``acts [L, N, F]`` -> reconstruction ``[L, N, D]`` of every layer's MLP output."""
        L = acts.shape[0]
        outs = [self.b_dec[s].expand(acts.shape[1], -1) for s in range(L)]
        for l in range(L):
            contrib = torch.einsum("nf,fsd->snd", acts[l], self.W_dec[l])  # [L-l, N, D]
            for j in range(L - l):
                outs[l + j] = outs[l + j] + contrib[j]
        return torch.stack(outs)

    def decoder_norms(self) -> torch.Tensor:
        """``[L, F]``: norm of each feature's decoder over all its target layers."""
        return torch.stack([w.flatten(1).norm(dim=1) for w in self.W_dec])


def _fvu_loss(recon: torch.Tensor, y: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """Mean over layers of ``||y - recon||^2 / var`` (``var [L]`` per-token total variance)."""
    return ((y - recon).pow(2).sum(-1).mean(-1) / var).mean()


def train_clt(
    x: torch.Tensor, y: torch.Tensor, cfg: CLTTrainConfig, log_every: int = 250, tag: str = ""
) -> tuple[dict[str, torch.Tensor | list[torch.Tensor]], dict]:
    """Train a JumpReLU CLT on activations.

    Args:
        x: ``[L, N, D]`` ``hook_resid_mid`` activations; y: ``[L, N, D]`` ``hook_mlp_out``.
    Returns:
        (weights in raw units for :func:`pie_lib.clt.save_clt` -- ``W_enc [L, F, D]``, ``b_enc [L, F]``,
        ``W_dec`` list of ``[F, L-l, D]``, ``b_dec [L, D]``, ``threshold [L, F]`` -- and training stats).
    """
    torch.manual_seed(cfg.seed)
    L, N, D = x.shape
    s_in = x.pow(2).sum(-1).mean(-1).div(D).sqrt()  # [L]
    s_out = y.pow(2).sum(-1).mean(-1).div(D).sqrt()
    xn, yn = x / s_in[:, None, None], y / s_out[:, None, None]
    var = (yn - yn.mean(1, keepdim=True)).pow(2).sum(-1).mean(-1)  # [L]
    clt = TrainableCLT(L, D, cfg.n_features, yn.mean(1))
    opt = torch.optim.Adam(clt.parameters(), lr=cfg.lr, betas=(0.9, 0.999))
    gen = torch.Generator().manual_seed(cfg.seed)
    phase2 = int(cfg.steps * (1 - cfg.jumprelu_frac))
    warm = max(1, int(cfg.steps * cfg.sparsity_warmup_frac))
    t0 = time.time()
    for step in range(cfg.steps):
        if step == phase2:
            _set_thresholds(clt, xn, cfg)
        idx = torch.randint(0, N, (cfg.batch_tokens,), generator=gen)
        xb, yb = xn[:, idx], yn[:, idx]
        _, acts = clt.encode(xb)
        recon = clt.decode(acts)
        rec = _fvu_loss(recon, yb, var)
        lam = cfg.sparsity_coef * min(1.0, (step + 1) / warm)
        sparsity = torch.tanh(cfg.tanh_scale * acts * clt.decoder_norms()[:, None, :]).sum(-1).mean()
        loss = rec + lam * sparsity
        lr = cfg.lr * min(1.0, 5 * (cfg.steps - step) / cfg.steps)  # linear decay over the last 20%
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if log_every and (step + 1) % log_every == 0:
            l0 = (acts != 0).sum(-1).float().mean().item()
            print(
                f"  [{tag} clt] step {step + 1}/{cfg.steps} fvu {rec.item():.4f} l0 {l0:.1f} "
                f"{'jumprelu' if clt.jumprelu else 'relu'} ({time.time() - t0:.0f}s)",
                flush=True,
            )
    weights = _export(clt, s_in, s_out)
    return weights, {"train_steps": cfg.steps, "seconds": round(time.time() - t0, 1), "n_train_tokens": N}


@torch.no_grad()
def _set_thresholds(clt: TrainableCLT, xn: torch.Tensor, cfg: CLTTrainConfig, n_tokens: int = 8192) -> None:
    """Per-feature thresholds from ReLU statistics; switch the model to JumpReLU."""
    pre, _ = clt.encode(xn[:, : min(n_tokens, xn.shape[1])])  # [L, n, F]
    pos = pre.clamp_min(0)
    count = (pos > 0).sum(1)  # [L, F]
    # median of positive activations: nanmedian over the positive entries only
    med = torch.where(pos > 0, pos, torch.full_like(pos, float("nan"))).nanmedian(dim=1).values
    fallback = torch.nanmedian(med[count > 0]) if (count > 0).any() else torch.tensor(1.0)
    med = torch.where(count > 0, med, fallback * 10)  # dead features: effectively off
    clt.threshold.copy_(cfg.threshold_frac * med)
    clt.jumprelu = True


@torch.no_grad()
def _export(clt: TrainableCLT, s_in: torch.Tensor, s_out: torch.Tensor) -> dict[str, Any]:
    """Fold the normalisation scales back in: raw-unit weights for ``save_clt``."""
    L = clt.W_enc.shape[0]
    return {
        "W_enc": clt.W_enc / s_in[:, None, None],
        "b_enc": clt.b_enc.clone(),
        "W_dec": [clt.W_dec[l] * s_out[l:][None, :, None] for l in range(L)],  # target s scaled by s_out[s]
        "b_dec": clt.b_dec * s_out[:, None],
        "threshold": clt.threshold.clone(),
    }


def save_trained_clt(folder: str | Path, weights: dict[str, Any], model_name: str) -> Path:
    """Write the trained CLT in circuit-tracer format (thresholds stored => JumpReLU)."""
    return save_clt(
        folder,
        weights["W_enc"],
        weights["b_enc"],
        weights["W_dec"],
        weights["b_dec"],
        threshold=weights["threshold"],
        model_name=model_name,
    )


@torch.no_grad()
def evaluate_clt(clt: Any, x: torch.Tensor, y: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-layer FVU and mean L0 of a loaded :class:`~pie_lib.clt.CrossLayerTranscoder`.

    Args:
        x, y: ``[L, N, D]`` held-out ``hook_resid_mid`` / ``hook_mlp_out`` (BOS excluded).
    Returns:
        (fvu per layer, l0 per layer).
    """
    acts = clt.encode(x)
    return fvu(clt.decode(acts), y).tolist(), mean_l0(acts).tolist()
