"""The blocked gelu_new gives transformers' NewGELUActivation bit for bit, and is what GPT-2 runs."""

from __future__ import annotations

import pytest
import torch
from transformers.activations import NewGELUActivation

from pie_lib.models import activations


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(3, 5, 7), (273, 15, 384), (1,), (2, 131073)])
def test_blocked_gelu_is_bitwise_the_same(shape, dtype):
    x = (torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * 4).to(dtype)
    want = NewGELUActivation()(x)
    for block in (activations.BLOCK, 1000, 64):
        got = activations.gelu_new_blocked(x, block)
        assert got.dtype == want.dtype and torch.equal(got, want)


def test_blocked_gelu_with_two_threads():
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x = torch.randn(300, 17, 384)
        assert torch.equal(activations.gelu_new_blocked(x), NewGELUActivation()(x))
    finally:
        torch.set_num_threads(n)


def test_gpt2_runs_it_for_inference_only(tiny_worlds, monkeypatch):
    w = tiny_worlds["gpt2"]
    calls = []
    real = activations.gelu_new_blocked
    monkeypatch.setattr(activations, "gelu_new_blocked", lambda x, *a: calls.append(1) or real(x, *a))
    ids = torch.tensor(w.model.tokenize([w.pairs[0].text_clean]))
    with torch.no_grad():
        out = w.model.hf(ids).logits
    assert len(calls) == w.model.n_layers
    # recording autograd: the module's own forward (in-place blocks would break the graph)
    emb = w.model.hf.transformer.wte(ids).detach().requires_grad_(True)
    calls.clear()
    logits = w.model.hf(inputs_embeds=emb).logits
    assert calls == [] and logits.requires_grad
    logits[0, -1, 0].backward()
    assert emb.grad is not None
    with torch.no_grad():
        assert torch.equal(w.model.hf(ids).logits, out)
