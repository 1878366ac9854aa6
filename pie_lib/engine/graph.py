"""Backward passes of the attribution graph: gradients of many target nodes in the replacement setting.

The replacement setting is the one FAP's gradient uses (spec §2.5): attention patterns frozen (the
Q/K projections detached), normalisation scales frozen, every MLP output a *leaf* (no gradient
through any MLP; the CLT stands in for it and its activations are held fixed). In that setting the
map from the residual-stream writes (embeddings, MLP outputs) to anything downstream is linear, so
the direct effect of a write ``w`` on a target is ``<w, d target / d write>`` exactly.

One trace handles a *batch of target nodes*: the prompt is repeated once per target (batch row
``b`` is target ``b``), each row's target is read off its own copy, and one backward of their sum
gives every target its own gradient (rows never interact). Targets are either a CLT feature's
encoder pre-activation ``W_enc[l][i] . x_l(t) + b_enc[l][i]`` at its (layer, position), or a logit
at the last position.

Shapes: L layers, N targets in a batch, T tokens, D d_model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from pie_lib.engine import remote as remote_
from pie_lib.engine.rules import detach_leading, frozen_norm
from pie_lib.engine.traces import _logits, _val, _walk_layers
from pie_lib.models.arch import get_path
from pie_lib.models.loading import LoadedModel


@dataclass
class GraphTargets:
    """A batch of target nodes for one prompt.

    Attributes:
        layer: ``[N]`` CLT layer whose pre-activation is the target, or -1 for a logit target.
        pos: ``[N]`` token position of a feature target (ignored for logits: the last position).
        enc: ``[N, D]`` encoder row ``W_enc[layer][feature]`` (zeros for logit targets).
        bias: ``[N]`` encoder bias (0 for logit targets), so the value is the real pre-activation.
        token: ``[N]`` vocabulary id of a logit target, -1 for feature targets.
    """

    layer: torch.Tensor
    pos: torch.Tensor
    enc: torch.Tensor
    bias: torch.Tensor
    token: torch.Tensor

    def __len__(self) -> int:
        return int(self.layer.numel())

    def slice(self, lo: int, hi: int) -> "GraphTargets":
        return GraphTargets(self.layer[lo:hi], self.pos[lo:hi], self.enc[lo:hi], self.bias[lo:hi], self.token[lo:hi])


@dataclass
class TargetGradients:
    """Gradients of each target w.r.t. every residual-stream write of the prompt.

    Attributes:
        mlp: ``[L, N, T, D]`` d target_b / d (MLP output of layer s at position t).
        embed: ``[N, T, D]`` d target_b / d (residual stream entering layer 0 at t).
    """

    mlp: torch.Tensor
    embed: torch.Tensor


@dataclass
class PromptWrites:
    """What the clean forward writes into the residual stream of one prompt.

    Attributes:
        embed: ``[T, D]`` the residual stream entering layer 0 (token + position embeddings, scaled
            as the architecture does).
        resid_mid: ``[L, T, D]`` CLT inputs.
        mlp_out: ``[L, T, D]`` real MLP outputs.
        last_logits: ``[V]`` logits at the last position.
    """

    embed: torch.Tensor
    resid_mid: torch.Tensor
    mlp_out: torch.Tensor
    last_logits: torch.Tensor


def _norm_eps(env: Any) -> tuple[float, Any]:
    mod = env._module if hasattr(env, "_module") else None
    eps = float(getattr(mod, "variance_epsilon", getattr(mod, "eps", 1e-5)))
    return eps, getattr(mod, "weight", None)


def prompt_writes(model: LoadedModel, input_ids: torch.Tensor) -> PromptWrites:
    """One no-grad forward of a single prompt ``[T]`` (or ``[1, T]``) saving its residual-stream writes."""
    ids = input_ids.reshape(1, -1).to(model.device)
    arch = model.arch
    resid: list[Any] = []
    mlp: list[Any] = []

    def read_in(layer: int, env: Any) -> None:
        resid.append(env.input.save())

    def read_out(layer: int, env: Any) -> None:
        mlp.append(env.output.save())

    with torch.no_grad(), remote_.trace(model, ids):
        emb = model.layer(0).input.save()
        _walk_layers(model, {arch.resid_mid: read_in, arch.mlp_out: read_out})
        last = _logits(model)[:, -1].save()
    return PromptWrites(
        embed=_val(emb)[0],
        resid_mid=torch.stack([_val(r)[0] for r in resid]),
        mlp_out=torch.stack([_val(m)[0] for m in mlp]),
        last_logits=_val(last)[0],
    )


def replacement_target_gradients(model: LoadedModel, input_ids: torch.Tensor, targets: GraphTargets) -> TargetGradients:
    """Gradients of a batch of targets in the replacement setting, in one forward and one backward.

    Args:
        input_ids: ``[T]`` (or ``[1, T]``) the prompt; it is repeated once per target.
        targets: N target nodes (features' pre-activations and/or last-position logits).
    Returns:
        :class:`TargetGradients` with ``mlp`` ``[L, N, T, D]`` and ``embed`` ``[N, T, D]``.
    """
    arch = model.arch
    n = len(targets)
    ids = input_ids.reshape(1, -1).to(model.device).expand(n, -1)
    dev = model.device
    layer_of = targets.layer.to(dev)
    pos_of = targets.pos.to(dev)
    enc = targets.enc.to(dev, torch.float32)
    # MLP outputs of layers >= the deepest feature target cannot reach it (it reads the stream before
    # that layer's MLP); with a logit target every layer is upstream
    upstream = model.n_layers if bool((targets.layer < 0).any()) else int(targets.layer.max())
    feat_rows = {int(l): (layer_of == l).nonzero().squeeze(-1) for l in torch.unique(targets.layer).tolist() if l >= 0}
    logit_rows = (layer_of < 0).nonzero().squeeze(-1)
    tokens = targets.token.to(dev)

    outs: list[Any] = []
    parts: list[Any] = []

    def norm_action(layer: int, env: Any) -> None:
        eps, w = _norm_eps(env)
        env.output = frozen_norm(arch.norm_kind, env.input, env.output, w, eps)

    def pattern_action(fraction: tuple[int, int]) -> Callable[[int, Any], None]:
        def act(layer: int, env: Any) -> None:
            env.output = detach_leading(env.output, fraction)

        return act

    def resid_action(layer: int, env: Any) -> None:
        # read the target pre-activations of this layer off the CLT input, then freeze the norm
        if layer in feat_rows:
            r = feat_rows[layer]
            x = env.input[r, pos_of[r]]  # [n_l, D]
            parts.append((x.float() * enc[r]).sum())
        if arch.resid_mid in arch.norms:
            norm_action(layer, env)

    def out_action(layer: int, env: Any) -> None:
        leaf = env.output.detach().requires_grad_(True)
        env.output = leaf
        outs.append(leaf)

    actions: dict[str, Callable[[int, Any], None]] = {}
    for nm in arch.norms:
        actions[nm] = norm_action
    for p in arch.pattern_inputs:
        actions[p.path] = pattern_action(p.fraction)
    actions[arch.resid_mid] = resid_action
    prev = actions.get(arch.mlp_out)
    if prev is not None:  # Gemma-2: mlp_out is a (frozen) norm: freeze, then make the leaf

        def both(layer: int, env: Any, prev=prev) -> None:
            prev(layer, env)
            out_action(layer, env)

        actions[arch.mlp_out] = both
    else:
        actions[arch.mlp_out] = out_action

    grads: list[Any] = []
    with (
        torch.enable_grad(),
        remote_.trace(model, ids, **({"logits_to_keep": 1} if arch.supports_logits_to_keep else {})),
    ):
        first = model.layer(0)
        emb_leaf = first.input.detach().requires_grad_(True)
        first.input = emb_leaf
        _walk_layers(model, actions)
        fn = get_path(model.lm, arch.final_norm)
        eps, w = _norm_eps(fn)
        fn.output = frozen_norm(arch.norm_kind, fn.input, fn.output, w, eps)
        logits = _logits(model)[:, -1]  # [N, V]
        if logit_rows.numel():
            parts.append(logits[logit_rows, tokens[logit_rows]].float().sum())
        total = sum(parts[1:], parts[0])
        with total.backward():
            # only MLP outputs upstream of some target get a gradient; nnsight wants them in reverse order
            for o in reversed(outs[:upstream]):
                grads.append(o.grad.save())
            g_emb = emb_leaf.grad.save()
    got = [_val(g).float() for g in reversed(grads)]
    zero = torch.zeros_like(got[0]) if got else torch.zeros(n, ids.shape[1], model.d_model, device=dev)
    mlp_g = torch.stack(got + [zero] * (model.n_layers - upstream))  # [L, N, T, D]
    emb_g = _val(g_emb).float()
    return TargetGradients(mlp=mlp_g, embed=emb_g)
