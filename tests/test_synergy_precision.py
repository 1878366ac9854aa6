"""FAP-Synergy's M(.) forwards in float32 whatever the model's dtype (issue 11, item 6)."""

from __future__ import annotations

import json

import torch

from pie_lib.engine.precision import float32_weights, runs_in_float32
from pie_lib.models.loading import load_model
from pie_lib.prune.context import BatchContext, ScoringConfig
from pie_lib.prune.occurrences import tokenize_pairs
from pie_lib.prune.params import MethodParams
from pie_lib.prune.patching import PatchEvaluator
from pie_lib.prune.scores import fap_scores
from pie_lib.prune.select import SynergyConfig, synergy_rerank
from pie_lib.prune.sweep import PruneConfig, run_prune


def _ctx(model, world):
    tok = tokenize_pairs(model, world.pairs, batch_size=4)
    return BatchContext(model, world.clt, tok.batches[0], ScoringConfig())


def test_bfloat16_model_reranks_with_float32_forwards_and_is_restored_exactly(llama_world):
    bf16 = load_model(llama_world.model_dir, device="cpu", dtype="bfloat16")
    before = {n: p.detach().clone() for n, p in bf16.hf.named_parameters()}
    # the reference: the same bfloat16 weights held as float32, reranked in "model" precision
    as_f32 = load_model(llama_world.model_dir, device="cpu", dtype="bfloat16")
    as_f32.hf.to(torch.float32)
    assert runs_in_float32(as_f32) and not runs_in_float32(bf16)
    ctx_f = _ctx(as_f32, llama_world)
    # the bfloat16 model patches the very same occurrences (same active set, rows and scores)
    ev_b = PatchEvaluator(
        bf16, ctx_f.clt, ctx_f.batch, ctx_f.occ, ctx_f.rows, "corrupted", "logit_diff", ctx_f.evaluator.clean_logits
    )
    s = fap_scores(ctx_f.occ, ctx_f.grads("replacement"), ctx_f.rows)
    for k in (6, 12):
        keep_b, trace_b = synergy_rerank(ev_b, s, k, SynergyConfig(precision="float32"), return_trace=True)
        keep_f, trace_f = synergy_rerank(ctx_f.evaluator, s, k, SynergyConfig(precision="model"), return_trace=True)
        assert torch.equal(keep_b, keep_f)
        for a, b in zip(trace_b.boosted, trace_f.boosted):
            torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-5, atol=1e-6)
    # the model is bit-for-bit what it was, in its own dtype, and its clean metric is its own again
    for n, p in bf16.hf.named_parameters():
        assert p.dtype == torch.bfloat16 and torch.equal(p, before[n]), n
    assert torch.equal(ev_b.m_clean, ctx_f.evaluator.m_clean)  # its model-dtype clean metric is back
    # in the model's own bfloat16 the same rerank sees different effects (rounding)
    _, trace_m = synergy_rerank(ev_b, s, 12, SynergyConfig(precision="model"), return_trace=True)
    assert any(a != b for x, y in zip(trace_m.boosted, trace_f.boosted) for a, b in zip(x, y))
    with float32_weights(as_f32) as converted:
        assert converted is False  # nothing to do for a float32 model


def test_precision_and_tolerance_are_recorded_in_config_json(llama_world, tmp_path):
    params = MethodParams(synergy=SynergyConfig(precision="model", eff_tol=0.01))
    cfg = PruneConfig(
        model=str(llama_world.model_dir),
        clt=str(llama_world.clt_dir),
        data=str(llama_world.pairs_path),
        n=2,
        methods=["fap-synergy"],
        k=[6],
        seeds=[0],
        out=str(tmp_path / "s"),
        batch_size=2,
        progress=False,
        params=params,
    )
    run_prune(cfg, model=llama_world.model, clt=llama_world.clt)
    stored = json.loads((tmp_path / "s" / "config.json").read_text())
    syn = stored["identity"]["params"]["synergy"]
    assert syn["precision"] == "model" and syn["eff_tol"] == 0.01


def test_per_module_upcast_is_bitwise_the_whole_model_upcast(llama_world, monkeypatch):
    """When a whole float32 copy does not fit the budget, modules upcast their own weights around
    their forward: the synergy trace is bitwise the same, and the model ends as it began."""
    from pie_lib.engine import precision

    bf16 = load_model(llama_world.model_dir, device="cpu", dtype="bfloat16")
    before = {n: p.detach().clone() for n, p in bf16.hf.named_parameters()}
    ctx = _ctx(bf16, llama_world)
    s = fap_scores(ctx.occ, ctx.grads("replacement"), ctx.rows)
    # a model-precision synergy first, so its bf16 clean keys and values are cached: the float32
    # runs must not reuse them
    synergy_rerank(ctx.evaluator, s, 12, SynergyConfig(precision="model"))
    runs = {}
    for name, fraction in (("whole", 1e9), ("per_module", 0.0)):
        monkeypatch.setattr(precision, "FLOAT32_COPY_FRACTION", fraction)
        runs[name] = synergy_rerank(ctx.evaluator, s, 12, SynergyConfig(precision="float32"), return_trace=True)
    (keep_w, trace_w), (keep_m, trace_m) = runs["whole"], runs["per_module"]
    assert torch.equal(keep_w, keep_m)
    assert trace_w.boosted == trace_m.boosted  # bitwise: the same float32 arithmetic
    for n, p in bf16.hf.named_parameters():
        assert p.dtype == torch.bfloat16 and torch.equal(p, before[n]), n
    assert not any(m._forward_pre_hooks and m is not bf16.hf.get_output_embeddings() for m in bf16.hf.modules())
    assert all(not m._forward_hooks for m in bf16.hf.modules())
