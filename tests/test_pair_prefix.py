"""The patch evaluator's prefix cache comes from the batch's clean + corrupted forward.

:class:`BatchContext` keeps the keys and values of its pair forward (``run_pair_caches(...,
keep_kv=True)``) and hands the clean half to its :class:`PatchEvaluator`, instead of the evaluator
running a second clean forward (``clean_prefix_cache``) when it first patches. The prefix must be
bitwise the one that separate forward builds, on both backends.
"""

from __future__ import annotations

import pytest
import torch

import pie_lib.prune.patching as patching
from pie_lib.data.tasks import generate_task
from pie_lib.engine.traces import clean_prefix_cache, mlp_out_gradients, run_with_cache
from pie_lib.errors import SettingError
from pie_lib.models.loading import LoadedModel
from pie_lib.prune.context import BatchContext, ScoringConfig, pair_forward_keeps_prefix
from pie_lib.prune.occurrences import tokenize_pairs
from pie_lib.world import load_world


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    yield


def _worlds(tiny_worlds):
    """transformers' Llama, Gemma-2 and GPT-2 (tiny random) and the native toy GPT-2 and Llama."""
    out = {f"hf-{arch}": (w.model, w.clt, w.pairs) for arch, w in tiny_worlds.items()}
    for arch in ("gpt2", "llama"):
        w = load_world(f"toy:{arch}", f"toy:{arch}", device="cpu")
        assert w.model.backend == "native"
        out[f"native-{arch}"] = (w.model, w.clt, generate_task("ioi", w.model.tokenizer, 6, seed=0).pairs)
    return out


def _same_prefix(a, b) -> None:
    assert a.precision == b.precision and len(a.kv) == len(b.kv)
    for (ka, va), (kb, vb) in zip(a.kv, b.kv):
        assert ka.shape == kb.shape and torch.equal(ka, kb) and torch.equal(va, vb)
    assert torch.equal(a.resid, b.resid) and torch.equal(a.mlp_out, b.mlp_out)


@pytest.mark.parametrize("corruption", ["corrupted", "zero"])
def test_pair_forward_prefix_is_the_clean_forwards(tiny_worlds, monkeypatch, corruption):
    for name, (model, clt, pairs) in _worlds(tiny_worlds).items():
        tok = tokenize_pairs(model, pairs, batch_size=4)
        batch = max(tok.batches, key=lambda b: b.size)
        calls = []
        real = patching.clean_prefix_cache
        monkeypatch.setattr(patching, "clean_prefix_cache", lambda *a: calls.append(a) or real(*a))
        ctx = BatchContext(model, clt, batch, ScoringConfig(corruption=corruption))
        assert ctx.evaluator.reuse_prefix, name
        seeded = ctx.evaluator.prefix_cache()
        assert calls == [], name  # no second clean forward
        _same_prefix(seeded, clean_prefix_cache(model, batch.clean_ids))
        # copied out of the pair forward's tensors: [B] rows, not views of the [2B] batch
        assert seeded.resid.shape[1] == batch.size and seeded.kv[0][0].shape[0] == batch.size
        assert seeded.resid.untyped_storage().nbytes() == seeded.resid.numel() * seeded.resid.element_size()


def test_no_keys_kept_where_prefixes_are_not_reused(llama_world):
    """logsumexp patches run whole prompts: the pair forward keeps no keys and values."""
    tok = tokenize_pairs(llama_world.model, llama_world.pairs, batch_size=4)
    ctx = BatchContext(llama_world.model, llama_world.clt, tok.batches[0], ScoringConfig(metric="logsumexp"))
    assert not ctx.evaluator.reuse_prefix and ctx.evaluator._prefix == {}
    with pytest.raises(SettingError, match="no use for a prefix cache"):
        ctx.evaluator.use_prefix_cache(clean_prefix_cache(llama_world.model, tok.batches[0].clean_ids))


def test_keep_kv_leaves_the_cache_values_alone(llama_world):
    model = llama_world.model
    ids = torch.tensor(model.tokenize([p.text_clean for p in llama_world.pairs if len(p.text_clean.split()) == 6]))
    plain, kept = run_with_cache(model, ids), run_with_cache(model, ids, keep_kv=True)
    assert plain.kv is None and kept.kv is not None and len(kept.kv) == model.n_layers
    for field in ("resid_mid", "mlp_out", "last_logits"):
        assert torch.equal(getattr(plain, field), getattr(kept, field)), field


def test_gpu_models_keep_their_own_prefix_forward(llama_world, monkeypatch):
    """Off the CPU the pair forward keeps no keys (a GPU BLAS may round the 2B-row batch otherwise)."""
    model, cfg = llama_world.model, ScoringConfig()
    assert pair_forward_keeps_prefix(model, cfg, 7)
    assert not pair_forward_keeps_prefix(model, ScoringConfig(metric="logsumexp"), 7)
    monkeypatch.setattr(LoadedModel, "device", property(lambda self: torch.device("cuda", 0)))
    assert not pair_forward_keeps_prefix(model, cfg, 7)


def test_replacement_gradients_from_the_given_mlp_outputs(tiny_worlds):
    """FAP's replacement gradient with the MLPs skipped (their outputs the pair forward's clean
    ones, leaves of the same value) is bitwise the gradient of the pass that runs them."""
    for name, (model, clt, pairs) in _worlds(tiny_worlds).items():
        tok = tokenize_pairs(model, pairs, batch_size=4)
        batch = max(tok.batches, key=lambda b: b.size)
        ctx = BatchContext(model, clt, batch, ScoringConfig())
        args = (model, batch.clean_ids, batch.correct, batch.wrong, "logit_diff")
        for mode in ("replacement", "full"):
            assert torch.equal(ctx.grads(mode), mlp_out_gradients(*args, mode)[0]), (name, mode)
        want = ctx.grads("replacement")
        given = ctx.evaluator.prefix_cache().mlp_out
        moved, _ = mlp_out_gradients(*args, "replacement", given * 1.5)
        uses_given = model.arch.mlp_out == model.arch.mlp
        assert uses_given == (not torch.equal(moved, want)), name  # the leaves are the given values


def test_given_mlp_outputs_skip_the_norm_in_front_of_the_mlp(tiny_worlds):
    """With the MLPs skipped, the norm that feeds each of them (``resid_mid``'s module) is skipped
    too (its output, read by nothing, is its input); the passes that run the MLPs run it."""
    for name, (model, clt, pairs) in _worlds(tiny_worlds).items():
        tok = tokenize_pairs(model, pairs, batch_size=4)
        ctx = BatchContext(model, clt, max(tok.batches, key=lambda b: b.size), ScoringConfig())
        mods = [model.envoy(layer, model.arch.resid_mid)._module for layer in range(model.n_layers)]
        passed_through: list[bool] = []
        hooks = [m.register_forward_hook(lambda _m, i, o: passed_through.append(torch.equal(o, i[0]))) for m in mods]
        try:
            ctx.grads("replacement")
            given, passed_through[:] = list(passed_through), []
            ctx.grads("full")
        finally:
            for h in hooks:
                h.remove()
        uses_given = model.arch.mlp_out == model.arch.mlp
        assert given == [uses_given] * model.n_layers, name
        assert passed_through == [False] * model.n_layers, name
