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
from typing import Any

import nnsight
import torch

from pie_lib.engine import remote as remote_
from pie_lib.engine.rules import detach_leading, frozen_norm
from pie_lib.engine.traces import _forward_steps, _val
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
    """One no-grad forward of a single prompt ``[T]`` (or ``[1, T]``) saving its residual-stream writes.

    Written to the engine's remote rules (:mod:`pie_lib.engine.remote`): the block reads prebuilt
    envoys only and binds stacked values to names inside it.
    """
    ids = remote_.host(model, input_ids.reshape(1, -1))
    arch = model.arch
    steps = [(rel == arch.resid_mid, env) for _, rel, env in _forward_steps(model, (arch.resid_mid, arch.mlp_out))]
    first = model.layer(0)
    lm = model.lm
    with torch.no_grad(), remote_.trace(model, ids, kind="graph-writes"):
        emb = nnsight.save(first.input)
        reads_in, reads_out = [], []
        for is_input, env in steps:
            if is_input:
                reads_in.append(env.input)
            else:
                reads_out.append(env.output)
        resid = nnsight.save(torch.stack(reads_in))
        mlp = nnsight.save(torch.stack(reads_out))
        out = lm.output
        last = nnsight.save((out.logits if hasattr(out, "logits") else out[0])[:, -1])
    return PromptWrites(
        embed=_val(emb)[0], resid_mid=_val(resid)[:, 0], mlp_out=_val(mlp)[:, 0], last_logits=_val(last)[0]
    )


def _norm_op(env: Any) -> tuple:
    eps, w = _norm_eps(env)
    return ("norm", env, eps, w is not None)


def replacement_target_gradients(model: LoadedModel, input_ids: torch.Tensor, targets: GraphTargets) -> TargetGradients:
    """Gradients of a batch of targets in the replacement setting, in one forward and one backward.

    Written to the engine's remote rules: the block reads a plan of envoys and plain values, marks
    its gradient leaves itself and binds stacked gradients to names inside it.

    Args:
        input_ids: ``[T]`` (or ``[1, T]``) the prompt; it is repeated once per target.
        targets: N target nodes (features' pre-activations and/or last-position logits).
    Returns:
        :class:`TargetGradients` with ``mlp`` ``[L, N, T, D]`` and ``embed`` ``[N, T, D]``.
    """
    arch = model.arch
    n = len(targets)
    ids = remote_.host(model, input_ids.reshape(1, -1).expand(n, -1))
    layer_of = targets.layer.cpu()
    pos_of = targets.pos.cpu()
    enc = targets.enc.detach().to("cpu", torch.float32)
    # MLP outputs of layers >= the deepest feature target cannot reach it (it reads the stream before
    # that layer's MLP); with a logit target every layer is upstream
    upstream = model.n_layers if bool((layer_of < 0).any()) else int(layer_of.max())
    feat_rows = {int(l): (layer_of == l).nonzero().squeeze(-1) for l in torch.unique(layer_of).tolist() if l >= 0}
    logit_rows = (layer_of < 0).nonzero().squeeze(-1)
    tokens = targets.token.cpu()
    norm_kind = arch.norm_kind

    # the plan, in forward order: read a layer's targets off the CLT input, freeze norms and patterns,
    # make every MLP output a leaf
    pattern = {p.path: p.fraction for p in arch.pattern_inputs}
    plan: list[tuple] = []
    for layer, rel, env in _forward_steps(model, set(arch.layer_order)):
        if rel == arch.resid_mid and layer in feat_rows:
            plan.append(("read", env, feat_rows[layer]))
        if rel in arch.norms:
            plan.append(_norm_op(env))
        if rel in pattern:
            plan.append(("pattern", env, pattern[rel]))
        if rel == arch.mlp_out:
            plan.append(("out", env))
    final = _norm_op(get_path(model.lm, arch.final_norm))
    first = model.layer(0)
    lm = model.lm
    g_mlp = None
    keep = {"logits_to_keep": 1} if arch.supports_logits_to_keep else {}
    with torch.enable_grad(), remote_.trace(model, ids, kind="graph-gradient", **keep):
        emb_leaf = first.input.detach().requires_grad_(True)
        first.input = emb_leaf
        leaves, parts = [], []
        for op in plan:
            env = op[1]
            if op[0] == "read":
                x = env.input
                r = op[2].to(x.device)
                parts.append((x[r, pos_of.to(x.device)[r]].float() * enc.to(x.device)[r]).sum())
            elif op[0] == "norm":
                env.output = frozen_norm(norm_kind, env.input, env.output, env._module.weight if op[3] else None, op[2])
            elif op[0] == "pattern":
                env.output = detach_leading(env.output, op[2])
            else:
                leaf = env.output.detach().requires_grad_(True)
                env.output = leaf
                leaves.append(leaf)
        fn = final[1]
        fn.output = frozen_norm(norm_kind, fn.input, fn.output, fn._module.weight if final[3] else None, final[2])
        out = lm.output
        logits = (out.logits if hasattr(out, "logits") else out[0])[:, -1]  # [N, V]
        if logit_rows.numel():
            rows = logit_rows.to(logits.device)
            parts.append(logits[rows, tokens.to(logits.device)[rows]].float().sum())
        total = sum(parts[1:], parts[0])
        with total.backward():
            # only MLP outputs upstream of some target get a gradient; nnsight wants them in reverse order
            grads_rev = [leaf.grad for leaf in reversed(leaves[:upstream])]
            if grads_rev:
                g_mlp = nnsight.save(torch.stack(grads_rev[::-1]).float())
            g_emb = nnsight.save(emb_leaf.grad.float())
    emb_g = _val(g_emb)
    shape = (n, ids.shape[1], model.d_model)
    got = _val(g_mlp) if g_mlp is not None else emb_g.new_zeros(0, *shape)
    rest = emb_g.new_zeros(model.n_layers - upstream, *shape)
    return TargetGradients(mlp=torch.cat([got, rest]), embed=emb_g)
