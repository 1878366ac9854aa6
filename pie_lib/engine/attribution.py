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
from typing import TYPE_CHECKING, Any, Iterator, Literal, cast

import nnsight
import torch

from pie_lib.engine import remote as remote_
from pie_lib.engine.rules import detach_leading, frozen_norm
from pie_lib.engine.traces import MetricKind, _forward_steps, _last_only, _val
from pie_lib.errors import SettingError
from pie_lib.models.arch import get_path
from pie_lib.models.loading import LoadedModel

if TYPE_CHECKING:
    from transformers import PreTrainedModel

PathGradient = Literal["replacement", "full"]
PathRule = Literal["right", "midpoint"]


def _norm_op(env: Any) -> tuple:
    mod = env._module if hasattr(env, "_module") else None
    eps = float(getattr(mod, "variance_epsilon", getattr(mod, "eps", 1e-5)))
    return ("norm", env, eps, getattr(mod, "weight", None) is not None)


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
    :func:`~pie_lib.engine.traces.mlp_out_gradients`, which the tests check. The block follows the
    remote rules of :mod:`pie_lib.engine.remote` (a plan of envoys built outside, inputs on the
    host, leaves marked inside, one stacked tensor saved), so it also runs on NDIF.

    Args:
        input_ids: ``[B, T]``; offsets: ``[L, B, T, D]`` subtracted from each layer's MLP output
            (downstream everything is recomputed, as in :func:`patched_last_logits`).
        correct, wrong: ``[B]`` target ids of each row. metric, mode: see the module doc;
            metric "kl" is the last-token KL(P_clean || P_patched), which needs ``clean_logits``
            ``[B, V]`` (its gradient tells which occurrences bring a circuit closer to the clean run).
    Returns:
        (grads ``[L, B, T, D]`` float32, metric ``[B]`` at the patched state).
    """
    if mode not in ("replacement", "full"):
        raise SettingError(f"gradient mode {mode!r} at a patched point; use 'replacement' or 'full'")
    if metric not in ("logit_diff", "logsumexp", "kl"):
        raise SettingError(f"unknown metric {metric!r}; use 'logit_diff', 'logsumexp' or 'kl'")
    if metric == "kl" and clean_logits is None:
        raise SettingError("the kl metric needs the clean last-token logits (clean_logits)")
    arch = model.arch
    freeze = mode == "replacement"
    norm_kind = arch.norm_kind
    # the plan: plain tuples of (op, envoy, values...), in forward order, read by the block below
    plan: list[tuple] = []
    pattern = {p.path: p.fraction for p in arch.pattern_inputs}
    for layer, rel, env in _forward_steps(model, set(arch.layer_order)):
        if freeze and rel in arch.norms:
            plan.append(_norm_op(env))
        if freeze and rel in pattern:
            plan.append(("pattern", env, pattern[rel]))
        if rel == arch.mlp_out:  # Gemma-2: mlp_out is a (frozen) norm: freeze above, then patch here
            plan.append(("out", env, layer))
    final = _norm_op(get_path(model.lm, arch.final_norm)) if freeze else None
    lm = model.lm
    off = remote_.host(model, offsets) if offsets is not None else None
    correct, wrong = remote_.host(model, correct), remote_.host(model, wrong)
    kind = 0 if metric == "logit_diff" else (1 if metric == "logsumexp" else 2)
    # kind 2 ("kl") has clean_logits (checked above)
    log_p = (
        remote_.host(model, torch.log_softmax(clean_logits.float(), -1))
        if kind == 2 and clean_logits is not None
        else None
    )
    keep = _last_only(model) if kind != 1 else {}
    with torch.enable_grad(), remote_.trace(model, remote_.host(model, input_ids), kind="gradient", **keep):
        leaves = []
        for op in plan:
            env = op[1]
            if op[0] == "norm":
                env.output = frozen_norm(norm_kind, env.input, env.output, env._module.weight if op[3] else None, op[2])
            elif op[0] == "pattern":
                env.output = detach_leading(env.output, op[2])
            else:
                y = env.output
                if off is not None:
                    y = y - off[op[2]].to(y.device, y.dtype)
                if freeze:  # the MLP output is a leaf: no gradient into the MLP or upstream of it
                    y = y.detach().requires_grad_(True)
                elif not y.requires_grad:
                    y.requires_grad_(True)
                env.output = y
                leaves.append(y)
        if final is not None:
            fn = final[1]
            fn.output = frozen_norm(norm_kind, fn.input, fn.output, fn._module.weight if final[3] else None, final[2])
        out = lm.output
        logits = out.logits if hasattr(out, "logits") else out[0]
        if kind == 0:
            last = logits[:, -1]
            rows = torch.arange(last.shape[0], device=last.device)
            m = last[rows, correct.to(last.device)] - last[rows, wrong.to(last.device)]
        elif kind == 1:
            m = torch.logsumexp(logits.float(), dim=-1).sum(-1)
        else:
            assert log_p is not None  # kind == 2: set above
            lp = log_p.to(logits.device)
            m = (lp.exp() * (lp - torch.log_softmax(logits[:, -1].float(), -1))).sum(-1)
        m_saved = nnsight.save(m.detach())
        with m.sum().backward():  # pyright: ignore[reportOptionalContextManager]  # nnsight: a context in a trace
            grads_rev = [leaf.grad for leaf in reversed(leaves)]  # nnsight wants .grad in reverse forward order
            grads = nnsight.save(torch.stack(grads_rev[::-1]))
    return _val(grads).float(), _val(m_saved)


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
    emb = cast("PreTrainedModel", model.hf).get_input_embeddings()  # hf is a transformers model

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


__all__ = [
    "ForwardCount",
    "PathGradients",
    "count_forwards",
    "path_alphas",
    "path_mlp_out_gradients",
    "patched_mlp_out_gradients",
]
