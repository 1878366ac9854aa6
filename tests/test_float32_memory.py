"""Float32 forwards of a bf16 model without a float32 copy of the (un)embedding table.

The per-module upcast (``engine.precision``) converts each module's weights around its forward.
The input and output embeddings are the largest modules by far (Gemma-2-2B's 256,000 x 2,304
table: 2.36 GB in float32, +3.5 GB at the conversion, the peak of a full-shape run). They run on
the float32 rows the ids use and on vocabulary chunks instead: bitwise the whole-model upcast's
numbers, and no allocation the size of the table.
"""

from __future__ import annotations

import pytest
import torch
from big_vocab import big_vocab_model, max_allocation

from pie_lib.engine import precision
from pie_lib.engine.precision import chunked_float32_linear, float32_weights
from pie_lib.engine.traces import run_with_cache
from pie_lib.models.loading import load_model


@pytest.mark.parametrize("backend", ["hf", "native"])
@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt2"])
def test_per_module_forward_is_bitwise_the_whole_model_upcast(tiny_worlds, arch, backend, one_torch_thread):
    model = load_model(tiny_worlds[arch].model_dir, device="cpu", dtype="bfloat16", backend=backend)
    assert model.backend == backend
    before = {n: p.detach().clone() for n, p in model.hf.named_parameters()}
    ids = torch.randint(3, model.vocab_size, (3, 7), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = 2
    with float32_weights(model, per_module=False):
        whole = run_with_cache(model, ids)
    head, emb = model.hf.get_output_embeddings(), model.hf.get_input_embeddings()
    with float32_weights(model, per_module=True):
        # the (un)embedding run on float32 rows / chunks: no hook of theirs upcasts their table
        assert all(
            h.__qualname__.startswith(("_embedding_hooks", "_unembedding_hooks"))
            for h in (*head._forward_hooks.values(), *emb._forward_hooks.values())
        )
        per_module = run_with_cache(model, ids)
        one = run_with_cache(model, ids[:1])  # B = 1: the strided last-position slice
    assert whole.last_logits.dtype == torch.float32
    assert torch.equal(whole.last_logits, per_module.last_logits)
    assert torch.equal(whole.mlp_out, per_module.mlp_out)
    assert torch.equal(whole.resid_mid, per_module.resid_mid)
    with float32_weights(model, per_module=False):
        one_whole = run_with_cache(model, ids[:1])
    assert torch.equal(one.last_logits, one_whole.last_logits)
    for n, p in model.hf.named_parameters():  # the model is back, bit for bit, in its own dtype
        assert p.dtype == torch.bfloat16 and torch.equal(p, before[n]), n
    assert all(not m._forward_hooks for m in model.hf.modules())


@pytest.mark.parametrize("backend", ["hf", "native"])
def test_per_module_upcast_never_allocates_a_float32_table(one_torch_thread, monkeypatch, tmp_path, backend):
    """A model whose (tied) embedding table dominates: the float32 forward's largest allocation
    stays far below the table's float32 size (it was one float32 copy of it, twice per forward)."""
    model = big_vocab_model(tmp_path / "m", backend, tied=True)
    V, D = model.vocab_size, model.d_model
    ids = torch.randint(3, V, (4, 9), generator=torch.Generator().manual_seed(1))
    table_f32 = 4 * V * D
    monkeypatch.setattr(precision, "UNEMBED_CHUNK_BYTES", table_f32 // 8)  # (64 MiB would hold this table)
    with float32_weights(model, per_module=True):
        run_with_cache(model, ids)  # warm-up (lazy initialisations)
        peak = max_allocation(lambda: run_with_cache(model, ids))
        got = run_with_cache(model, ids).last_logits
    assert peak < table_f32 // 4, f"largest allocation {peak} B against a {table_f32} B float32 table"
    with float32_weights(model, per_module=False):
        assert torch.equal(run_with_cache(model, ids).last_logits, got)


def test_chunked_float32_linear_is_the_unchunked_matmul(monkeypatch):
    """Bitwise, for 1-300 input rows, vocabularies with short and long remainders, with a bias."""
    g = torch.Generator().manual_seed(0)
    D = 48
    monkeypatch.setattr(precision, "UNEMBED_CHUNK_BYTES", 4 * D * 256)  # 256-row blocks
    for V in (1000, 1024, 1025, 1283, 1536 - 3):
        W = torch.randn(V, D, generator=g).to(torch.bfloat16)
        b = torch.randn(V, generator=g).to(torch.bfloat16)
        for shape in ((1, 1, D), (3, 1, D), (5, 1, D), (3, 7, D), (300, D)):
            x = torch.randn(*shape, generator=g)
            assert torch.equal(chunked_float32_linear(x, W), torch.nn.functional.linear(x, W.float())), (V, shape)
            want = torch.nn.functional.linear(x, W.float(), b.float())
            assert torch.equal(chunked_float32_linear(x, W, b), want), (V, shape)
