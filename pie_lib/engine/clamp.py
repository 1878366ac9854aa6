"""Greedy generation with one CLT feature *clamped* to a value (FADE's steering, spec §8).

FADE steers a feature by setting its activation to ``c * a_max`` at every position. For a CLT
feature i of source layer l that means: at every forward, read the residual stream at layer l
(hook_resid_mid, the input of the pre-MLP norm), compute the feature's own activation a(t), and
add ``(v - a(t)) * W_dec[l][i, s - l]`` to the MLP output of every target layer s >= l -- the
feature's write becomes ``v * W_dec`` instead of ``a(t) * W_dec``. The residual at layer l is
computed before any of those writes, so a(t) is the feature's activation on the current text.
Position 0 (BOS) is left alone, as everywhere in pie_lib.

The additive mode (``c * a_max * W_dec`` added whatever a(t) is) is
:func:`pie_lib.engine.generation.steered_greedy`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import nnsight
import torch

from pie_lib.engine.traces import _forward_steps
from pie_lib.errors import SettingError
from pie_lib.models.loading import LoadedModel

if TYPE_CHECKING:
    from pie_lib.clt.transcoder import CrossLayerTranscoder


def clamp_parts(clt: CrossLayerTranscoder, layers: torch.Tensor, feats: torch.Tensor) -> dict[str, torch.Tensor | None]:
    """Encoder rows, biases, thresholds and per-target-layer decoder rows of the clamped features.

    Returns:
        ``w [R, D]``, ``b [R]``, ``thr [R]`` (None for ReLU), ``dec [L, R, D]`` (row r's write into
        layer s; zero for s < its source layer).
    Raises:
        SettingError: a TopK CLT (a single feature's activation is not defined without the others).
    """
    if clt.threshold is None and getattr(clt.config, "activation", "relu") == "topk":
        raise SettingError("clamp steering needs a ReLU or JumpReLU CLT; use steering='add' for a TopK CLT")
    L, D = clt.n_layers, clt.d_model
    w = clt.W_enc[layers, feats].float()  # [R, D]
    b = clt.b_enc[layers, feats].float()
    thr = clt.threshold[layers, feats].float() if clt.threshold is not None else None
    dec = torch.zeros(L, layers.numel(), D)
    for layer in torch.unique(layers).tolist():
        rows = (layers == layer).nonzero().squeeze(-1)
        d = clt.decoder_rows(layer, feats[rows]).float().cpu()  # [r, n_out, D]
        dec[layer : layer + d.shape[1], rows] = d.permute(1, 0, 2)
    return {"w": w.cpu(), "b": b.cpu(), "thr": None if thr is None else thr.cpu(), "dec": dec}


@torch.no_grad()
def clamped_greedy(
    model: LoadedModel,
    clt: CrossLayerTranscoder,
    layers: torch.Tensor,
    feats: torch.Tensor,
    values: torch.Tensor,
    prompt_ids: torch.Tensor,
    gen_tokens: int,
) -> torch.Tensor:
    """Greedy continuations with feature ``(layers[r], feats[r])`` of row r clamped to ``values[r]``.

    Args:
        layers, feats, values: ``[R]`` source layer, feature index and clamp value per row.
        prompt_ids: ``[R, T0]`` prompts of one length (BOS first).
        gen_tokens: new tokens per row (end-of-sequence never stops a row early).
    Returns:
        ``[R, gen_tokens]`` generated ids (CPU).
    Raises:
        SettingError: a remote model (the per-step read of the residual is local only for now).
    """
    if model.remote:
        raise SettingError("clamp steering runs locally only; use steering='add' with --remote")
    model.require_generate("clamp steering")
    R = prompt_ids.shape[0]
    if gen_tokens < 1 or R == 0:
        return torch.zeros(R, max(gen_tokens, 0), dtype=torch.long)
    parts = clamp_parts(clt, layers, feats)
    dev = model.device
    w, b, dec = (cast(torch.Tensor, parts[k]).to(dev) for k in ("w", "b", "dec"))  # only "thr" may be None
    thr = parts["thr"].to(dev) if parts["thr"] is not None else None
    v = values.float().to(dev)
    src = layers.to(dev)
    arch = model.arch
    steps = _forward_steps(model, (arch.resid_mid, arch.mlp_out))
    pad = getattr(model.tokenizer, "pad_token_id", None)
    kw = {
        "max_new_tokens": gen_tokens,
        "do_sample": False,
        "eos_token_id": None,
        "pad_token_id": pad if pad is not None else 0,
    }
    with model.lm.generate(prompt_ids.to(dev), **kw) as tracer:
        for step_i, _ in enumerate(tracer.iter[0:gen_tokens]):
            delta = None  # [R, T] (v - a(t)) of each row, set when its source layer is reached
            for layer, rel, env in steps:
                if rel == arch.resid_mid and bool((src == layer).any()):
                    x = env.input.float()  # [R, T, D]
                    pre = torch.einsum("rtd,rd->rt", x, w) + b[:, None]
                    act = pre * (pre > thr[:, None]) if thr is not None else torch.relu(pre)
                    d = (v[:, None] - act) * (src == layer).float()[:, None]
                    if step_i == 0:
                        d[:, 0] = 0.0  # BOS
                    delta = d if delta is None else delta + d
                elif rel == arch.mlp_out and delta is not None:
                    y = env.output
                    env.output = y + (delta[..., None] * dec[layer][:, None, :]).to(y.dtype)
        new = nnsight.save(tracer.result[:, prompt_ids.shape[1] :])
    return new.cpu()


__all__ = ["clamp_parts", "clamped_greedy"]
