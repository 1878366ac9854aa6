"""Gradients at patched points of the model: what FAP-IG and FAP-iterative need (issue #17).

FAP takes one gradient at the clean run. The methods beyond the paper take it elsewhere:

- at a *partially removed* state -- the real forward with fixed offsets subtracted from the MLP
  outputs, the same intervention the circuit evaluation uses (:func:`patched_mlp_out_gradients`);
- at every point of the straight path from "every active occurrence removed" (the corrupted CLT
  activations, α = 0) to the clean run (α = 1): state α subtracts ``(1 - α)`` of every active
  occurrence's delta write (:func:`path_mlp_out_gradients`). All points of all prompts of a batch
  are stacked along the batch axis and run as ONE forward and ONE backward (split only when
  ``max_rows`` asks for it).

The gradient rules are those of :func:`pie_lib.engine.traces.mlp_out_gradients` (spec §2.5):
``replacement`` freezes attention patterns and norm scales and makes every MLP output a leaf;
``full`` is the true gradient. The metric of a row is that of its own prompt, and rows do not
interact, so the gradient of the summed metric gives every row its own gradient.

:func:`count_forwards` counts the sequences a block of code pushes through the model (a
forward with a backward counts once), for the cost columns of the notebooks.

Shapes: L layers, B rows (prompts, or prompts x path points), T tokens, D d_model, S path points.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Literal

import torch

from pie_lib.engine.rules import detach_leading, frozen_norm
from pie_lib.engine.traces import MetricKind, _last_only, _logits, _val, _walk_layers, metric_value
from pie_lib.errors import SettingError
from pie_lib.models.arch import get_path
from pie_lib.models.loading import LoadedModel

PathGradient = Literal["replacement", "full"]
PathRule = Literal["right", "midpoint"]


def _norm_eps(env: Any) -> tuple[float, Any]:
    mod = env._module if hasattr(env, "_module") else None
    return float(getattr(mod, "variance_epsilon", getattr(mod, "eps", 1e-5))), getattr(mod, "weight", None)


def patched_mlp_out_gradients(
    model: LoadedModel,
    input_ids: torch.Tensor,
    offsets: torch.Tensor | None,
    correct: torch.Tensor,
    wrong: torch.Tensor,
    metric: MetricKind | Literal["kl"] = "logit_diff",
    mode: PathGradient = "replacement",
    clean_logits: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Metric gradient w.r.t. every MLP output of the forward with ``offsets`` subtracted.

    With ``offsets=None`` (or all zeros) this is the clean gradient of
    :func:`~pie_lib.engine.traces.mlp_out_gradients`, which the tests check.

    Args:
        input_ids: ``[B, T]``; offsets: ``[L, B, T, D]`` subtracted from each layer's MLP output
            (downstream everything is recomputed, as in :func:`patched_last_logits`).
        correct, wrong: ``[B]`` target ids of each row. metric, mode: see the module doc;
            metric "kl" is the last-token KL(P_clean || P_patched), which needs ``clean_logits``
            ``[B, V]`` (its gradient tells which occurrences bring a circuit closer to the clean run).
    Returns:
        (grads ``[L, B, T, D]`` float32 on the model's device, metric ``[B]`` at the patched state).
    """
    if mode not in ("replacement", "full"):
        raise SettingError(f"gradient mode {mode!r} at a patched point; use 'replacement' or 'full'")
    if metric == "kl" and clean_logits is None:
        raise SettingError("the kl metric needs the clean last-token logits (clean_logits)")
    log_p = torch.log_softmax(clean_logits.float(), -1).to(model.device) if metric == "kl" else None
    arch = model.arch
    freeze = mode == "replacement"
    off = offsets.to(model.device) if offsets is not None else None
    outs: list[Any] = []

    def norm_action(layer: int, env: Any) -> None:
        eps, w = _norm_eps(env)
        env.output = frozen_norm(arch.norm_kind, env.input, env.output, w, eps)

    def pattern_action(fraction: tuple[int, int]) -> Callable[[int, Any], None]:
        def act(layer: int, env: Any) -> None:
            env.output = detach_leading(env.output, fraction)

        return act

    def out_action(layer: int, env: Any) -> None:
        value = env.output if off is None else env.output - off[layer].to(env.output.dtype)
        if freeze:  # the MLP output is a leaf: no gradient into the MLP (or anything upstream of it)
            value = value.detach().requires_grad_(True)
        elif off is None:
            value.requires_grad_(True)
        env.output = value
        outs.append(value)

    actions: dict[str, Callable[[int, Any], None]] = {}
    if freeze:
        for n in arch.norms:
            actions[n] = norm_action
        for p in arch.pattern_inputs:
            actions[p.path] = pattern_action(p.fraction)
    prev = actions.get(arch.mlp_out)
    if prev is not None:  # Gemma-2: mlp_out is a (frozen) norm: freeze, then patch and capture
        def both(layer: int, env: Any, prev=prev) -> None:
            prev(layer, env)
            out_action(layer, env)

        actions[arch.mlp_out] = both
    else:
        actions[arch.mlp_out] = out_action

    correct = correct.to(model.device)
    wrong = wrong.to(model.device)
    grads: list[Any] = []
    keep = _last_only(model) if metric in ("logit_diff", "kl") else {}
    with torch.enable_grad(), model.trace(input_ids.to(model.device), **keep):
        _walk_layers(model, actions)
        if freeze:
            fn = get_path(model.lm, arch.final_norm)
            eps, w = _norm_eps(fn)
            fn.output = frozen_norm(arch.norm_kind, fn.input, fn.output, w, eps)
        logits = _logits(model)
        if log_p is not None:
            log_q = torch.log_softmax(logits[:, -1].float(), -1)
            m = (log_p.exp() * (log_p - log_q)).sum(-1)
        else:
            m = metric_value(logits, correct, wrong, metric)
        m_saved = m.detach().save()
        with m.sum().backward():
            for o in reversed(outs):  # nnsight wants .grad in reverse forward order
                grads.append(o.grad.save())
    grads = [_val(g).float() for g in reversed(grads)]
    return torch.stack(grads), _val(m_saved)


def path_alphas(steps: int, rule: PathRule = "right") -> torch.Tensor:
    """``[S]`` points of the path: ``j/S`` for j = 1..S ("right": one step = the clean end, i.e.
    plain FAP) or ``(j - 1/2)/S`` ("midpoint": second-order accurate)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise SettingError(f"--ig-steps {steps!r}: the number of path points must be a positive integer")
    j = torch.arange(1, steps + 1, dtype=torch.float64)
    if rule == "right":
        return (j / steps).float()
    if rule == "midpoint":
        return ((j - 0.5) / steps).float()
    raise SettingError(f"path rule {rule!r}; use 'right' or 'midpoint'")


@dataclass
class PathGradients:
    """Result of :func:`path_mlp_out_gradients`.

    Attributes:
        mean: ``[L, B, T, D]`` gradient averaged over the path points (what FAP-IG projects).
        metric: ``[S, B]`` metric at every path point (the last row is the clean metric for "right").
        alphas: ``[S]`` the points.
    """

    mean: torch.Tensor
    metric: torch.Tensor
    alphas: torch.Tensor


def path_mlp_out_gradients(
    model: LoadedModel,
    input_ids: torch.Tensor,
    full_offsets: torch.Tensor,
    correct: torch.Tensor,
    wrong: torch.Tensor,
    alphas: torch.Tensor,
    metric: MetricKind = "logit_diff",
    mode: PathGradient = "replacement",
    max_rows: int | None = None,
) -> PathGradients:
    """Gradients at every point of the path corrupted -> clean, all points in one batched pass.

    Row (j, b) runs prompt b with ``(1 - alphas[j]) * full_offsets[:, b]`` subtracted from the MLP
    outputs: α = 0 removes every active occurrence (the corrupted CLT activations), α = 1 is the
    clean run.

    Args:
        input_ids: ``[B, T]``; full_offsets: ``[L, B, T, D]`` every active occurrence's delta writes.
        alphas: ``[S]`` path points (:func:`path_alphas`).
        max_rows: rows per forward/backward (None: all ``S * B`` rows at once -- the default; only a
            memory limit should split them, and the result does not depend on it).
    Returns:
        :class:`PathGradients`.
    """
    B = input_ids.shape[0]
    S = alphas.numel()
    rows = S * B
    step = rows if max_rows is None else max(1, int(max_rows))
    dev = full_offsets.device
    a = alphas.to(dev, full_offsets.dtype)
    total: torch.Tensor | None = None
    metrics = torch.empty(rows)
    for lo in range(0, rows, step):
        hi = min(rows, lo + step)
        j = torch.arange(lo, hi) // B  # path point of each row (point-major: rows j*B .. j*B + B-1)
        b = torch.arange(lo, hi) % B
        off = full_offsets[:, b.to(dev)] * (1.0 - a[j.to(dev)])[None, :, None, None]  # [L, r, T, D]
        g, m = patched_mlp_out_gradients(model, input_ids[b], off, correct[b], wrong[b], metric, mode)
        # sum the rows of each prompt over their path points: [L, r, T, D] -> [L, B, T, D]
        part = torch.zeros(g.shape[0], B, *g.shape[2:], dtype=g.dtype, device=g.device)
        part.index_add_(1, b.to(g.device), g)
        total = part if total is None else total + part
        metrics[lo:hi] = m.float().cpu()
    assert total is not None
    return PathGradients(mean=total / S, metric=metrics.view(S, B), alphas=alphas)


@dataclass
class ForwardCount:
    """Sequences pushed through the model inside :func:`count_forwards` (``n``) and passes (``calls``)."""

    n: int = 0
    calls: int = 0


@contextmanager
def count_forwards(model: LoadedModel) -> Iterator[ForwardCount]:
    """Count every sequence the model embeds while the block runs (a forward + backward counts once).

    A forward hook on the input embedding sees each trace's batch, whatever engine function runs it.
    Remote (NDIF) runs execute elsewhere and are not counted.
    """
    counter = ForwardCount()
    emb = model.hf.get_input_embeddings()

    def hook(module: Any, inputs: tuple, output: Any) -> None:
        ids = inputs[0] if inputs else None
        if isinstance(ids, torch.Tensor) and ids.dim() >= 2:
            counter.n += int(ids.shape[0])
            counter.calls += 1

    handle = emb.register_forward_hook(hook)
    try:
        yield counter
    finally:
        handle.remove()


__all__ = ["ForwardCount", "PathGradients", "count_forwards", "path_alphas", "path_mlp_out_gradients",
           "patched_mlp_out_gradients"]
