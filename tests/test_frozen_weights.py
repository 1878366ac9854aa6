"""Loaded models are frozen, and freezing changes no number.

pie_lib never differentiates with respect to weights, so ``load_model`` / ``wrap_model`` freeze them
(a full-shape backward otherwise builds GBs of unused weight gradients). Frozen weights alone would
send the unembedding of a strided last-position slice down a different (and on CPU ~500x slower)
matmul path; the contiguous-input hook keeps it on the same path, so the logits are bitwise those of
the trainable model.
"""

from __future__ import annotations

import torch

from pie_lib.engine.traces import run_with_cache
from pie_lib.world import load_world


def test_weights_frozen_and_last_logits_bitwise_unchanged():
    world = load_world("toy:llama", "toy:llama", device="cpu")
    model = world.model
    assert not any(p.requires_grad for p in model.hf.parameters())
    ids = torch.randint(5, 200, (6, 15), generator=torch.Generator().manual_seed(0))
    frozen = run_with_cache(model, ids)
    head = model.hf.get_output_embeddings()
    hooks = dict(head._forward_pre_hooks)
    try:
        for p in model.hf.parameters():
            p.requires_grad_(True)
        head._forward_pre_hooks.clear()
        trainable = run_with_cache(model, ids)  # the behaviour before freezing
    finally:
        for p in model.hf.parameters():
            p.requires_grad_(False)
        head._forward_pre_hooks.update(hooks)
    assert torch.equal(frozen.last_logits, trainable.last_logits)
    assert torch.equal(frozen.mlp_out, trainable.mlp_out)
