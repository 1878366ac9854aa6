"""Steering a CLT feature during generation (FADE faithfulness, spec §8).

Two modes, ``a_max`` = the feature's largest natural |activation|:

- ``"add"``: steering feature i of source layer l by factor c adds ``c * a_max * W_dec[l][i, s-l]``
  to the MLP output of every target layer s of the feature, at every position, at every
  generation step, whatever the feature's own activation is.
- ``"clamp"`` (FADE's definition): the feature's activation is *set* to ``c * a_max`` at every
  position but BOS (:func:`pie_lib.engine.clamp.clamped_greedy`); factor 0 ablates the feature. Decoding is greedy. All (feature,
factor, prompt) combinations run as one batch (chunked by ``batch_size``); each chunk is one
nnsight ``generate`` (:func:`pie_lib.engine.generation.steered_greedy`), and remote, all chunks
together are one request.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch
from tqdm.auto import tqdm

from pie_lib.engine.clamp import clamped_greedy
from pie_lib.engine.generation import steered_greedy
from pie_lib.engine.remote import is_remote
from pie_lib.interpret.examples import FeatureKey, features_by_layer

if TYPE_CHECKING:
    from pie_lib.clt.transcoder import CrossLayerTranscoder
    from pie_lib.models.loading import LoadedModel


def steering_vectors(clt: CrossLayerTranscoder, features: Sequence[FeatureKey]) -> torch.Tensor:
    """Decoder rows of ``features`` laid out per target layer.

    Returns:
        ``[L, U, D]``: entry ``[s, u]`` is feature u's write into layer s (zero for layers it does
        not write to). One decoder gather per source layer; no loop over features.
    """
    L, D = clt.n_layers, clt.d_model
    V = torch.zeros(L, len(features), D, dtype=torch.float32, device=clt.device)
    index = {key: u for u, key in enumerate(features)}
    for layer, feats in features_by_layer(features).items():
        rows = clt.decoder_rows(layer, feats).to(V)  # [U_l, n_out, D]
        cols = torch.tensor([index[(layer, int(f))] for f in feats.tolist()], device=V.device)
        n_out = rows.shape[1]
        V[layer : layer + n_out, cols] = rows.permute(1, 0, 2)
    return V


@torch.no_grad()
def steered_generate(
    model: LoadedModel,
    clt: CrossLayerTranscoder,
    features: Sequence[FeatureKey],
    scales: Sequence[float],
    prompt_ids: torch.Tensor,
    factors: Sequence[float],
    gen_tokens: int,
    batch_size: int = 64,
    progress: bool = False,
    mode: str = "add",
) -> torch.Tensor:
    """Greedy continuations of every prompt under every (feature, factor) steering.

    Args:
        model: a LoadedModel; clt: its CLT.
        features: U (layer, feature) pairs; scales: ``[U]`` their max natural |activation|.
        prompt_ids: ``[P, T0]`` prompts of one length (BOS first).
        factors: K steering factors (0 = unsteered).
        gen_tokens: new tokens per continuation.
        mode: "add" (additive) or "clamp" (FADE: activation set to factor x scale; local only).
    Returns:
        ``[U, K, P, gen_tokens]`` generated token ids.
    """
    U, K, P = len(features), len(factors), prompt_ids.shape[0]
    if mode not in ("add", "clamp"):
        raise ValueError(f"steering mode {mode!r}: use 'add' or 'clamp'")
    if mode == "clamp":
        return _clamped(model, clt, features, scales, prompt_ids, factors, gen_tokens, batch_size, progress)
    V = steering_vectors(clt, features)  # [L, U, D]
    coef = (
        torch.tensor(list(factors), dtype=torch.float32)[None, :]
        * torch.tensor(list(scales), dtype=torch.float32)[:, None]
    )
    # rows in (u, k, p) order
    u_idx = torch.arange(U).repeat_interleave(K * P)
    c_row = coef.reshape(-1).repeat_interleave(P)
    p_idx = torch.arange(P).repeat(U * K)
    chunks = [(lo, min(lo + batch_size, U * K * P)) for lo in range(0, U * K * P, batch_size)]
    jobs = [
        (prompt_ids[p_idx[lo:hi]], (V[:, u_idx[lo:hi]].cpu() * c_row[lo:hi, None])[:, :, None, :])  # [L, b, 1, D]
        for lo, hi in chunks
    ]
    if is_remote(model):  # every chunk in one request
        new = steered_greedy(model, jobs, gen_tokens)
    else:
        new = [
            steered_greedy(model, [job], gen_tokens)[0]
            for job in tqdm(jobs, desc="steered generation", disable=not progress, unit="batch")
        ]
    out = torch.cat(new) if new else torch.empty(0, gen_tokens, dtype=torch.long)
    return out.reshape(U, K, P, gen_tokens)


def _clamped(
    model: LoadedModel,
    clt: CrossLayerTranscoder,
    features: Sequence[FeatureKey],
    scales: Sequence[float],
    prompt_ids: torch.Tensor,
    factors: Sequence[float],
    gen_tokens: int,
    batch_size: int,
    progress: bool,
) -> torch.Tensor:
    """:func:`steered_generate` in clamp mode: rows in (u, k, p) order, ``batch_size`` rows per generate."""
    U, K, P = len(features), len(factors), prompt_ids.shape[0]
    lay = torch.tensor([layer for layer, _ in features], dtype=torch.long).repeat_interleave(K * P)
    fea = torch.tensor([f for _, f in features], dtype=torch.long).repeat_interleave(K * P)
    val = torch.tensor(list(factors), dtype=torch.float32)[None, :] * torch.tensor(list(scales))[:, None]
    val = val.reshape(-1).repeat_interleave(P)
    p_idx = torch.arange(P).repeat(U * K)
    n = U * K * P
    chunks = [slice(lo, lo + batch_size) for lo in range(0, n, batch_size)]
    new = [
        clamped_greedy(model, clt, lay[c], fea[c], val[c], prompt_ids[p_idx[c]], gen_tokens)
        for c in tqdm(chunks, desc="clamped generation", disable=not progress, unit="batch")
    ]
    out = torch.cat(new) if new else torch.empty(0, gen_tokens, dtype=torch.long)
    return out.reshape(U, K, P, gen_tokens)
