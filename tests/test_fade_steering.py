"""Steering during generation and activations of texts, checked against plain torch references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pie_lib.evaluate.protocol import text_activations
from pie_lib.evaluate.steering import steered_generate, steering_vectors
from pie_lib.interpret.examples import encode_features

KEYS = [(0, 1), (2, 7), (1, 3)]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def world(interp_world):
    return interp_world[2:]


def _reference_generate(lm, prompts: torch.Tensor, vecs: dict[int, torch.Tensor], n: int) -> torch.Tensor:
    """Greedy decoding on the plain HF module, adding ``vecs[s]`` to layer s's MLP output via hooks."""
    hf = lm.hf
    hooks = [hf.model.layers[s].mlp.register_forward_hook(lambda mod, inp, out, v=v: out + v) for s, v in vecs.items()]
    try:
        ids = prompts.clone()
        with torch.no_grad():
            for _ in range(n):
                nxt = hf(ids).logits[:, -1].argmax(-1)
                ids = torch.cat([ids, nxt[:, None]], 1)
    finally:
        for h in hooks:
            h.remove()
    return ids[:, prompts.shape[1] :]


def test_steering_vectors_layout(world):
    _, clt = world
    V = steering_vectors(clt, KEYS)
    for u, (layer, f) in enumerate(KEYS):
        rows = clt.decoder_rows(layer, torch.tensor([f]))[0]  # [n_out, D]
        for s in range(clt.n_layers):
            want = rows[s - layer] if s >= layer else torch.zeros(clt.d_model)
            assert torch.allclose(V[s, u], want)


def test_steered_generation_matches_hooked_reference(world):
    lm, clt = world
    prompts = torch.tensor([[2, 10, 11, 12, 13], [2, 20, 21, 22, 23]])
    factors, scales = [0.0, 10.0, -50.0], [0.8, 1.5, 0.3]
    out = steered_generate(lm, clt, KEYS, scales, prompts, factors, gen_tokens=5, batch_size=4)
    assert out.shape == (3, 3, 2, 5)
    plain = _reference_generate(lm, prompts, {}, 5)
    V = steering_vectors(clt, KEYS)
    changed = False
    for u in range(len(KEYS)):
        assert torch.equal(out[u, 0], plain)  # factor 0 = unsteered greedy decoding
        for k, fac in enumerate(factors[1:], 1):
            vecs = {s: fac * scales[u] * V[s, u] for s in range(clt.n_layers)}
            ref = _reference_generate(lm, prompts, vecs, 5)
            assert torch.equal(out[u, k], ref)
            changed |= not torch.equal(ref, plain)
    assert changed  # the steering does something in this world


def test_steered_generation_through_remote_local(world):
    lm, clt = world
    prompts = torch.tensor([[2, 10, 11, 12]])
    a = steered_generate(lm, clt, KEYS[:1], [1.0], prompts, [0.0, 10.0], gen_tokens=3)
    lm.remote = "local"  # nnsight's local simulation of remote execution
    try:
        b = steered_generate(lm, clt, KEYS[:1], [1.0], prompts, [0.0, 10.0], gen_tokens=3)
    finally:
        lm.remote = False
    assert torch.equal(a, b)


def test_text_activations_match_single_texts(world):
    lm, clt = world
    from pie_lib.engine.traces import run_with_cache

    toks = [[2, 10, 11, 12], [2, 30, 31], [2, 5, 6, 7, 8, 9], [2, 40, 41, 42]]
    keys = [KEYS[0], KEYS[1], KEYS[0], KEYS[2]]
    got = text_activations(lm, clt, toks, keys, batch_size=3)
    for t, (layer, f), g in zip(toks, keys, got):
        a = encode_features(clt, run_with_cache(lm, torch.tensor([t])).resid_mid[layer], layer, torch.tensor([f]))[
            0, 1:, 0
        ]
        want = float(a[a.abs().argmax()]) if len(a) else 0.0
        assert g == pytest.approx(want, abs=1e-6)
    assert np.isfinite(got).all()
