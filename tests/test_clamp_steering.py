"""Clamp steering (FADE's definition: the feature's activation set to a value) against plain HF hooks."""

from __future__ import annotations

import torch

from pie_lib.engine.clamp import clamp_parts, clamped_greedy


def _reference(world, layer: int, feat: int, value: float, prompt: torch.Tensor, gen: int) -> torch.Tensor:
    """Greedy decoding with full forwards (no cache) and forward hooks doing the clamp by hand."""
    hf, clt = world.model.hf, world.clt
    w, b = clt.W_enc[layer, feat].float(), clt.b_enc[layer, feat].float()
    thr = clt.threshold[layer, feat].float() if clt.threshold is not None else None
    rows = clt.decoder_rows(layer, torch.tensor([feat])).float()[0]  # [n_out, D]
    state = {}
    blocks = hf.model.layers

    def read(_mod, args):
        pre = args[0].float() @ w + b
        a = pre * (pre > thr) if thr is not None else torch.relu(pre)
        d = value - a
        d[:, 0] = 0.0  # BOS untouched
        state["d"] = d

    def write(s):
        def hook(_mod, _args, out):
            return out + (state["d"][..., None] * rows[s - layer]).to(out.dtype)

        return hook

    handles = [blocks[layer].post_attention_layernorm.register_forward_pre_hook(read)]
    handles += [blocks[s].mlp.register_forward_hook(write(s)) for s in range(layer, layer + rows.shape[0])]
    ids = prompt[None].clone()
    try:
        with torch.no_grad():
            for _ in range(gen):
                nxt = hf(ids).logits[:, -1].argmax(-1, keepdim=True)
                ids = torch.cat([ids, nxt], dim=1)
    finally:
        for h in handles:
            h.remove()
    return ids[0, prompt.numel() :]


def test_clamped_generation_equals_hand_written_hooks(llama_world):
    tok = llama_world.model.tokenizer
    text = llama_world.pairs[0].text_clean
    prompt = torch.tensor(tok(text)["input_ids"][:6])
    L = llama_world.clt.n_layers
    layers = torch.tensor([0, L - 1, 1, 0, 0])
    feats = torch.tensor([3, 5, 7, 3, 3])
    values = torch.tensor([4.0, -3.0, 2.5, 0.0, 500.0])  # 0 = the feature ablated
    out = clamped_greedy(llama_world.model, llama_world.clt, layers, feats, values, prompt.repeat(5, 1), 5)
    plain = llama_world.model.hf.generate(prompt[None], max_new_tokens=5, do_sample=False)[0, prompt.numel() :]
    assert not torch.equal(out[4], plain)  # a strong clamp changes the continuation (the test can fail)
    for r in range(5):
        ref = _reference(llama_world, int(layers[r]), int(feats[r]), float(values[r]), prompt, 5)
        assert torch.equal(out[r], ref), r
    parts = clamp_parts(llama_world.clt, layers, feats)
    assert parts["dec"][: L - 1, 1].abs().sum() == 0  # a last-layer feature writes only into the last layer


def test_steered_generate_clamp_mode_lays_rows_out_like_add_mode(llama_world):
    from pie_lib.evaluate.steering import steered_generate

    tok = llama_world.model.tokenizer
    prompts = torch.tensor([tok(p.text_clean)["input_ids"][:5] for p in llama_world.pairs[:2]])
    feats, scales, factors = [(0, 3), (1, 7)], [1.5, 2.0], [0.0, 10.0]
    out = steered_generate(
        llama_world.model, llama_world.clt, feats, scales, prompts, factors, 4, batch_size=3, mode="clamp"
    )
    assert out.shape == (2, 2, 2, 4)
    for u, (layer, f) in enumerate(feats):
        for k, c in enumerate(factors):
            one = clamped_greedy(
                llama_world.model,
                llama_world.clt,
                torch.tensor([layer, layer]),
                torch.tensor([f, f]),
                torch.full((2,), c * scales[u]),
                prompts,
                4,
            )
            assert torch.equal(out[u, k], one)
