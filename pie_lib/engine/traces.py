"""Every nnsight trace pie_lib runs. Each takes the model's ``remote`` setting.

The traces exchange only dense ``d_model`` tensors with the model (residual streams in, offsets
in, gradients and last-token logits out); CLT encoding and decoding happen outside the trace, on
the caller's device. That keeps remote (NDIF) runs possible without shipping CLT weights, except
for :func:`spliced_last_logits`, which runs the CLT inside the forward by design.

Shapes: L layers, B batch (prompts or patch variants, all of one token length T), D d_model,
V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch

from pie_lib.engine.rules import detach_leading, frozen_norm, half_rule, identity_rule
from pie_lib.models.arch import get_path
from pie_lib.models.loading import LoadedModel

MetricKind = Literal["logit_diff", "logsumexp"]
GradientMode = Literal["replacement", "full", "relp"]


@dataclass
class ForwardCache:
    """What one clean (or corrupted) forward leaves behind.

    Attributes:
        resid_mid: ``[L, B, T, D]`` CLT inputs (hook_resid_mid).
        mlp_out: ``[L, B, T, D]`` real MLP outputs (hook_mlp_out).
        last_logits: ``[B, V]`` logits at the last position.
    """

    resid_mid: torch.Tensor
    mlp_out: torch.Tensor
    last_logits: torch.Tensor


def _val(x: Any) -> torch.Tensor:
    """nnsight may hand back a saved proxy or the tensor itself, depending on version/backend."""
    return x.value if hasattr(x, "value") and not isinstance(x, torch.Tensor) else x


def _walk_layers(model: LoadedModel, actions: dict[str, Callable[[int, Any], None]]) -> None:
    """Call ``actions[rel_path](layer, envoy)`` for every layer, in forward order.

    nnsight requires modules to be touched in the order the forward reaches them.
    """
    arch = model.arch
    for layer in range(model.n_layers):
        for rel in arch.layer_order:
            if rel in actions:
                actions[rel](layer, model.envoy(layer, rel))


def _logits(model: LoadedModel) -> Any:
    out = model.lm.output
    return out.logits if hasattr(out, "logits") else out[0]


def _last_only(model: LoadedModel) -> dict[str, int]:
    """Ask HF to project only the last position onto the vocabulary (big vocabularies, soft-caps)."""
    return {"logits_to_keep": 1} if model.arch.supports_logits_to_keep else {}


def run_with_cache(model: LoadedModel, input_ids: torch.Tensor) -> ForwardCache:
    """One forward of ``input_ids`` ``[B, T]`` saving resid_mid, mlp_out and last-token logits."""
    arch = model.arch
    resid, mlp = [], []

    def read_in(layer: int, env: Any) -> None:
        resid.append(env.input.save())

    def read_out(layer: int, env: Any) -> None:
        mlp.append(env.output.save())

    actions = {arch.resid_mid: read_in}
    if arch.mlp_out == arch.resid_mid:  # pragma: no cover - no such architecture today
        raise AssertionError("resid_mid and mlp_out must be different modules")
    actions[arch.mlp_out] = read_out
    with torch.no_grad(), model.trace(input_ids.to(model.device), **_last_only(model)):
        _walk_layers(model, actions)
        last = _logits(model)[:, -1].save()
    return ForwardCache(
        resid_mid=torch.stack([_val(r) for r in resid]),
        mlp_out=torch.stack([_val(m) for m in mlp]),
        last_logits=_val(last),
    )


def metric_value(logits: torch.Tensor, correct: torch.Tensor, wrong: torch.Tensor, kind: MetricKind) -> torch.Tensor:
    """Per-prompt metric ``[B]`` from logits ``[B, T, V]`` (or last-token ``[B, V]`` for logit_diff).

    logit_diff: ``logit[-1, correct] - logit[-1, wrong]``;
    logsumexp: sum over positions of ``logsumexp(logits[t])`` (the reference script's default flag).
    """
    if kind == "logit_diff":
        last = logits[:, -1] if logits.dim() == 3 else logits
        idx = torch.arange(last.shape[0], device=last.device)
        return last[idx, correct.to(last.device)] - last[idx, wrong.to(last.device)]
    if kind == "logsumexp":
        if logits.dim() != 3:
            raise ValueError("the logsumexp metric needs logits at every position [B, T, V]")
        return torch.logsumexp(logits.float(), dim=-1).sum(-1)
    raise ValueError(f"unknown metric {kind!r}; use 'logit_diff' or 'logsumexp'")


def mlp_out_gradients(
    model: LoadedModel,
    input_ids: torch.Tensor,
    correct: torch.Tensor,
    wrong: torch.Tensor,
    metric: MetricKind = "logit_diff",
    mode: GradientMode = "replacement",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient of the metric w.r.t. every layer's MLP output, in one forward/backward.

    Modes (spec §2.5, §6):
      - ``replacement``: attention patterns frozen (Q/K detached), norm scales frozen, MLP outputs
        are leaves (no gradient through any MLP);
      - ``full``: the true model gradient;
      - ``relp``: CLT-RelP's relevance: patterns and norm scales frozen as above, MLPs traversed with
        the LRP identity rule on the activation and the half rule on the gated product.

    Args:
        input_ids: ``[B, T]`` clean prompts; correct, wrong: ``[B]`` target token ids.
    Returns:
        (grads ``[L, B, T, D]``, metric ``[B]``). Prompts in a batch do not interact, so the
        gradient of the summed metric gives each prompt its own gradient.
    """
    arch = model.arch
    outs: list[Any] = []
    freeze = mode in ("replacement", "relp")

    def norm_action(layer: int, env: Any) -> None:
        mod = env._module if hasattr(env, "_module") else None
        eps = float(getattr(mod, "variance_epsilon", getattr(mod, "eps", 1e-5)))
        w = getattr(mod, "weight", None)
        env.output = frozen_norm(arch.norm_kind, env.input, env.output, w, eps)

    def pattern_action(fraction: tuple[int, int]) -> Callable[[int, Any], None]:
        def act(layer: int, env: Any) -> None:
            env.output = detach_leading(env.output, fraction)

        return act

    def relp_mlp(env: Any) -> None:
        if arch.mlp_kind == "gated":
            gate = get_path(env, arch.mlp_in[0])
            act_env = get_path(env, arch.mlp_act)
            z = gate.output
            act_env.output = identity_rule(z, act_env.output)
            a = act_env.output
            u = get_path(env, arch.mlp_in[1]).output
            get_path(env, arch.mlp_down).input = half_rule(a, u)
        else:
            act_env = get_path(env, arch.mlp_act)
            act_env.output = identity_rule(act_env.input, act_env.output)

    def out_action(layer: int, env: Any) -> None:
        if arch.mlp_out == arch.mlp and mode == "relp":
            relp_mlp(env)
        if mode == "replacement":
            leaf = env.output.detach().requires_grad_(True)
            env.output = leaf
            outs.append(leaf)
        else:
            if mode == "full":
                env.output.requires_grad_(True)
            outs.append(env.output)

    actions: dict[str, Callable[[int, Any], None]] = {}
    if freeze:
        for n in arch.norms:
            actions[n] = norm_action
        for p in arch.pattern_inputs:
            actions[p.path] = pattern_action(p.fraction)
    if mode == "relp" and arch.mlp != arch.mlp_out:
        actions[arch.mlp] = lambda layer, env: relp_mlp(env)
    prev = actions.get(arch.mlp_out)
    if prev is not None:  # Gemma-2: mlp_out is a (frozen) norm: freeze, then capture
        def both(layer: int, env: Any, prev=prev) -> None:
            prev(layer, env)
            out_action(layer, env)

        actions[arch.mlp_out] = both
    else:
        actions[arch.mlp_out] = out_action

    correct = correct.to(model.device)
    wrong = wrong.to(model.device)
    grads: list[Any] = []  # created outside the trace: nnsight only pushes back saved names
    keep = _last_only(model) if metric == "logit_diff" else {}
    with torch.enable_grad(), model.trace(input_ids.to(model.device), **keep):
        _walk_layers(model, actions)
        if freeze:
            fn = get_path(model.lm, arch.final_norm)
            mod = fn._module if hasattr(fn, "_module") else None
            eps = float(getattr(mod, "variance_epsilon", getattr(mod, "eps", 1e-5)))
            fn.output = frozen_norm(arch.norm_kind, fn.input, fn.output, getattr(mod, "weight", None), eps)
        logits = _logits(model)
        m = metric_value(logits, correct, wrong, metric)
        m_saved = m.detach().save()
        with m.sum().backward():
            for o in reversed(outs):  # nnsight wants .grad in reverse forward order
                grads.append(o.grad.save())
    grads = [_val(g) for g in reversed(grads)]
    return torch.stack(grads), _val(m_saved)


def patched_last_logits(
    model: LoadedModel, input_ids: torch.Tensor, offsets: torch.Tensor, with_logsumexp: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Real-model forward with fixed additive offsets *subtracted* from every MLP output.

    Removing an occurrence subtracts its delta writes (spec §3); everything downstream is recomputed.

    Args:
        input_ids: ``[B, T]``; offsets: ``[L, B, T, D]`` (what to subtract at each layer).
        with_logsumexp: also return the logsumexp metric (sum over positions), computed in the
            trace so full ``[B, T, V]`` logits never leave it.
    Returns:
        (``[B, V]`` last-token logits, ``[B]`` logsumexp metric or None).
    """
    offsets = offsets.to(model.device)

    def sub(layer: int, env: Any) -> None:
        env.output = env.output - offsets[layer].to(env.output.dtype)

    lse = None
    keep = {} if with_logsumexp else _last_only(model)
    with torch.no_grad(), model.trace(input_ids.to(model.device), **keep):
        _walk_layers(model, {model.arch.mlp_out: sub})
        logits = _logits(model)
        last = logits[:, -1].save()
        if with_logsumexp:
            lse = torch.logsumexp(logits.float(), dim=-1).sum(-1).save()
    return _val(last), (_val(lse) if lse is not None else None)


def spliced_last_logits(model: LoadedModel, clt: Any, input_ids: torch.Tensor, error: torch.Tensor) -> torch.Tensor:
    """Forward with every MLP output replaced by ``CLT reconstruction + error``.

    The CLT encodes the residual stream *of this forward* at each layer (so any change upstream
    propagates through the transcoder); ``error`` ``[L, B, T, D]`` is held fixed. With the error of
    the clean run, the logits equal the model's own (the splice identity).

    Returns:
        ``[B, V]`` last-token logits.
    """
    arch = model.arch
    L = model.n_layers
    accum: list[torch.Tensor | None] = [None] * L
    error = error.to(model.device)

    def encode(layer: int, env: Any) -> None:
        x = env.input
        acts = clt.encode(x.to(clt.dtype), layer=layer)  # [B, T, F]
        used = (acts != 0).flatten(0, 1).any(0).nonzero().squeeze(-1)
        if used.numel():
            rows = clt.decoder_rows(layer, used)  # [U, n_out, D]
            writes = torch.einsum("btu,usd->sbtd", acts[..., used], rows.to(acts.dtype))
            for j, s in enumerate(clt.targets(layer)):
                accum[s] = writes[j] if accum[s] is None else accum[s] + writes[j]

    def write(layer: int, env: Any) -> None:
        rec = clt.b_dec[layer].to(error.dtype) + (accum[layer] if accum[layer] is not None else 0)
        env.output = (rec + error[layer]).to(env.output.dtype)

    with torch.no_grad(), model.trace(input_ids.to(model.device), **_last_only(model)):
        _walk_layers(model, {arch.resid_mid: encode, arch.mlp_out: write})
        last = _logits(model)[:, -1].save()
    return _val(last)
