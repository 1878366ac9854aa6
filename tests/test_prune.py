"""Prune: scores against plain loops, selectors, Synergy worked example, evaluation identities."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch

from pie_lib.engine.traces import patched_last_logits, run_with_cache
from pie_lib.errors import BudgetError
from pie_lib.prune.context import BatchContext, ScoringConfig
from pie_lib.prune.occurrences import Occurrences, tokenize_pairs
from pie_lib.prune.params import MethodParams
from pie_lib.prune.patching import Variants
from pie_lib.prune.registry import get_methods
from pie_lib.prune.retention import evaluate_keep_masks
from pie_lib.prune.scores import factp_scores, fap_scores, hash_uniform
from pie_lib.prune.select import SynergyConfig, fap_signal, rank_within, synergy_rerank, topk_global, topk_per_layer
from pie_lib.prune.sweep import PruneConfig, load_selections, run_prune


@pytest.fixture(scope="module")
def ctx(llama_world):
    tok = tokenize_pairs(llama_world.model, llama_world.pairs, batch_size=3)
    return BatchContext(llama_world.model, llama_world.clt, tok.batches[0], ScoringConfig())


def test_active_set_is_union_and_excludes_bos(ctx):
    occ = ctx.occ
    assert len(occ) > 50
    assert (occ.pos > 0).all()
    assert ((occ.a_clean != 0) | (occ.a_corr != 0)).all()
    # sorted by (prompt, layer, pos, feat)
    key = ((occ.prompt * 100 + occ.layer) * 100 + occ.pos) * 1000 + occ.feat
    assert (key[1:] > key[:-1]).all()
    assert (occ.a_clean == 0).any() and (occ.a_corr == 0).any(), "both one-sided cases should occur"


def test_vectorised_fap_equals_per_occurrence_loop(ctx):
    g = ctx.grads("replacement")
    s = fap_scores(ctx.occ, g, ctx.rows)
    occ, clt = ctx.occ, ctx.clt
    ref = torch.zeros(len(occ))
    for n in range(len(occ)):  # the straightforward reading of spec §2.3-2.6
        l, b, t, f = int(occ.layer[n]), int(occ.prompt[n]), int(occ.pos[n]), int(occ.feat[n])
        da = occ.a_clean[n] - occ.a_corr[n]
        W = clt.decoder_rows(l, torch.tensor([f]))[0]
        ref[n] = sum(float(torch.dot(da * W[s - l], g[s, b, t])) for s in range(l, clt.n_layers))
    torch.testing.assert_close(s, ref, rtol=1e-4, atol=1e-6)


def _frozen_gpt2_metric(model, ids, offsets, correct, wrong):
    """An explicit replacement-model forward of GPT-2 written from scratch: LayerNorm scales and
    attention patterns frozen at their clean values, MLP outputs fixed to clean + offsets."""
    hf = model.hf
    before = hf.config._attn_implementation
    hf.set_attn_implementation("eager")  # so the clean attention patterns are returned
    try:
        with torch.no_grad():
            out = hf(ids, output_attentions=True, output_hidden_states=True)
    finally:
        hf.set_attn_implementation(before)
    clean = run_with_cache(model, ids)
    tr = hf.transformer
    x = tr.wte(ids) + tr.wpe(torch.arange(ids.shape[1]))[None]

    def frozen_ln(ln, h, h_clean):
        s = torch.rsqrt(h_clean.var(-1, keepdim=True, unbiased=False) + ln.eps)
        return ln.weight * (h - h.mean(-1, keepdim=True)) * s + ln.bias

    for l, block in enumerate(tr.h):
        x_clean = out.hidden_states[l]
        a = frozen_ln(block.ln_1, x, x_clean)
        qkv = block.attn.c_attn(a)
        v = qkv[..., 2 * model.d_model :]
        H = block.attn.num_heads
        v = v.view(*v.shape[:2], H, -1).transpose(1, 2)
        att = (out.attentions[l] @ v).transpose(1, 2).reshape(x.shape)
        h = x + block.attn.c_proj(att)
        x = h + clean.mlp_out[l] + offsets[l]
    # hidden_states[-1] is after ln_f in HF GPT-2: recompute the pre-ln_f residual of the clean run
    pre = clean.resid_mid[-1] + clean.mlp_out[-1]
    y = frozen_ln(tr.ln_f, x, pre)
    logits = hf.lm_head(y)[:, -1]
    rows = torch.arange(ids.shape[0])
    return logits[rows, correct] - logits[rows, wrong]


def test_fap_matches_finite_difference_of_replacement_model(tiny_worlds):
    w = tiny_worlds["gpt2"]
    tok = tokenize_pairs(w.model, w.pairs, batch_size=2)
    b = tok.batches[0]
    c = BatchContext(w.model, w.clt, b, ScoringConfig())
    s = fap_scores(c.occ, c.grads("replacement"), c.rows)
    # removing a single occurrence scaled by eps: m changes by -eps * S (the model is linear here)
    eps = 1e-2
    base = _frozen_gpt2_metric(
        w.model, b.clean_ids, torch.zeros(w.model.n_layers, *b.clean_ids.shape, w.model.d_model), b.correct, b.wrong
    )
    picks = torch.argsort(s.abs(), descending=True)[:5]
    for n in picks.tolist():
        v = Variants(
            c.occ.prompt[[n]], torch.tensor([0]), torch.tensor([n]), torch.tensor([False]), weight=torch.tensor([eps])
        )
        off = c.evaluator.offsets(v.var, v.occ, v.weight, 1)  # [L, 1, T, D] for that prompt
        full = torch.zeros(w.model.n_layers, *b.clean_ids.shape, w.model.d_model)
        full[:, int(c.occ.prompt[n])] = off[:, 0]
        m = _frozen_gpt2_metric(w.model, b.clean_ids, -full, b.correct, b.wrong)
        fd = (m - base)[int(c.occ.prompt[n])] / eps
        torch.testing.assert_close(fd, -s[n], rtol=1e-3, atol=1e-5)


def test_factp_equals_single_forwards(ctx):
    eff = factp_scores(ctx.evaluator)
    m_clean = ctx.evaluator.clean_metric()
    for n in [0, len(ctx.occ) // 2, len(ctx.occ) - 1]:
        b = int(ctx.occ.prompt[n])
        v = Variants.singles(ctx.occ.prompt[[n]], torch.tensor([n]))
        off = ctx.evaluator.offsets(v.var, v.occ, None, 1)
        logits, _ = patched_last_logits(ctx.model, ctx.batch.clean_ids[[b]], off)
        m = logits[0, ctx.batch.correct[b]] - logits[0, ctx.batch.wrong[b]]
        torch.testing.assert_close(eff[n], m_clean[b] - m, rtol=1e-4, atol=1e-6)


def test_evaluation_identities(ctx):
    occ = ctx.occ
    everything = torch.ones(len(occ), dtype=torch.bool)
    nothing = torch.zeros(len(occ), dtype=torch.bool)
    ev = evaluate_keep_masks(ctx, torch.stack([everything, nothing]))
    # keeping all: clean behaviour, faithfulness 1, complement = null
    assert torch.allclose(ev["kl"][0], torch.zeros(occ.n_prompts), atol=1e-6)
    torch.testing.assert_close(ev["faithfulness"][0], torch.ones(occ.n_prompts), atol=1e-4, rtol=0)
    torch.testing.assert_close(ev["m_complement"][0], ev["m_null"], atol=1e-4, rtol=0)
    # keeping nothing: the null circuit
    torch.testing.assert_close(ev["kl"][1], ev["kl_null"], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ev["completeness"][1], torch.ones(occ.n_prompts), atol=1e-4, rtol=0)
    assert (ev["kl_null"] > 0).all()
    assert (ev["n_kept"][0] == ev["n_active"]).all()


def _occ_from_counts(counts):
    prompt = torch.cat([torch.full((c,), i) for i, c in enumerate(counts)]).long()
    n = prompt.numel()
    z = torch.zeros(n, dtype=torch.long)
    return Occurrences(prompt, z, torch.arange(n), torch.arange(n), torch.ones(n), torch.zeros(n), len(counts))


def test_topk_ties_clipping_and_errors():
    occ = _occ_from_counts([5, 3])
    s = torch.tensor([1.0, -3.0, 3.0, 0.5, 0.5, 2.0, 2.0, -2.0])
    keep = topk_global(occ, s, 2)
    assert keep.tolist() == [False, True, True, False, False, True, True, False]  # tie: earlier wins
    keep = topk_global(occ, s, 10)  # K >= active set keeps everything, no error
    assert keep.all()
    per = topk_global(occ, s, torch.tensor([1, 3]))
    assert per.tolist() == [False, True, False, False, False, True, True, True]
    for bad in (0, -1, 1.5, True):
        with pytest.raises(BudgetError):
            topk_global(occ, s, bad)
    empty = _occ_from_counts([0, 0])
    assert topk_global(empty, torch.zeros(0), 5).numel() == 0


def test_per_layer_and_signal():
    occ = _occ_from_counts([6])
    occ.layer = torch.tensor([0, 0, 0, 1, 1, 1])
    s = torch.tensor([5.0, -4.0, 1.0, 3.0, -0.5, 2.0])
    assert topk_per_layer(occ, s, 1).tolist() == [True, False, False, True, False, False]
    occ2 = _occ_from_counts([8])
    s2 = torch.tensor([9.0, 8.0, 7.0, 6.0, -1.0, -0.5, 5.0, 4.0])
    keep = fap_signal(occ2, s2, 4, gamma=0.25)  # 1 positive floor, 1 negative floor, 2 by |S|
    assert keep.tolist() == [True, True, False, False, True, False, False, False] or keep.sum() == 4
    assert keep[4] and keep[0] and keep.sum() == 4


class FakeEvaluator:
    """M(S) = sum of single effects + pairwise synergies: a fully known world."""

    def __init__(self, eff, syn, delta):
        n = len(eff)
        z = torch.zeros(n, dtype=torch.long)
        self.occ = Occurrences(z, z, torch.arange(n), torch.arange(n), delta.clone(), torch.zeros(n), 1)
        self.delta = delta
        self.eff, self.syn = eff, syn
        self.n_forwards = 0

    def clean_metric(self):
        return torch.tensor([10.0])

    def run(self, variants, retain=False):  # keeps no state (its results carry none)
        self.n_forwards += 1
        V = variants.n
        M = torch.zeros(V)
        for v in range(V):
            members = variants.occ[variants.var == v].tolist()
            M[v] = sum(self.eff[i] for i in members) + sum(
                self.syn.get((min(a, b), max(a, b)), 0.0) for a in members for b in members if a < b
            )
        return type("R", (), {"metric": 10.0 - M, "kl": M.abs(), "pred_change": M > 0})()


def test_synergy_worked_example():
    # 12 occurrences, scores descending by index; K=8, bp=50 -> half=2, core=order[:6],
    # boundary=order[6:10]; partners = the 6 core occurrences.
    scores = torch.tensor([12.0, 11, 10, 9, 8, 7, 6, 5.5, 5, 4.5, 1, 0.5])
    eff = [1.0] * 12
    delta = torch.ones(12)
    # occurrence 9 (last in the boundary) cooperates strongly with every partner
    syn = {(p, 9): 3.0 for p in range(6)}
    ev = FakeEvaluator(eff, syn, delta)
    cfg = SynergyConfig(lam=3.0, boundary_percent=50.0, boundary_cap=32, partners=32, partners_per_candidate=8, seed=0)
    keep, trace = synergy_rerank(ev, scores, 8, cfg, return_trace=True)
    # hand computation: base_scale = lower median of top-8 |S| = 8; med_partner = 1
    # candidate 9: base 4.5/8 + 3 * 3/(1+1e-6) ~= 9.56; candidates 6, 7, 8: 6/8, 5.5/8, 5/8 (no synergy)
    assert trace.boundary[0] == [6, 7, 8, 9]
    np.testing.assert_allclose(trace.boosted[0], [6 / 8, 5.5 / 8, 5 / 8, 4.5 / 8 + 3 * 3 / (1 + 1e-6)], rtol=1e-6)
    assert keep.nonzero().squeeze(-1).tolist() == [0, 1, 2, 3, 4, 5, 6, 9]
    # the reference's partner draws: random.Random(seed + 1337).sample(range(6), 6) per candidate
    rng = random.Random(1337)
    draws = [rng.sample(range(6), 6) for _ in range(4)]
    assert all(sorted(d) == list(range(6)) for d in draws)
    # with lambda = 0 the selection is plain top-K
    keep0 = synergy_rerank(FakeEvaluator(eff, syn, delta), scores, 8, SynergyConfig(lam=0.0, boundary_percent=50.0))
    assert keep0.nonzero().squeeze(-1).tolist() == list(range(8))


def test_synergy_equals_fap_at_large_k(ctx):
    s = fap_scores(ctx.occ, ctx.grads("replacement"), ctx.rows)
    k = 400
    syn = synergy_rerank(ctx.evaluator, s, k, SynergyConfig())
    assert torch.equal(syn, topk_global(ctx.occ, s, k))


def test_synergy_partner_draws_follow_reference_rng(ctx):
    """With fewer than 8 partners every candidate samples all of them; with more, a subset whose
    identity is fixed by random.Random(seed + 1337); different seeds may differ, same seed never."""
    s = fap_scores(ctx.occ, ctx.grads("replacement"), ctx.rows)
    a = synergy_rerank(ctx.evaluator, s, 60, SynergyConfig(seed=0, boundary_percent=50))
    b = synergy_rerank(ctx.evaluator, s, 60, SynergyConfig(seed=0, boundary_percent=50))
    assert torch.equal(a, b)
    assert int(a.sum()) == int(torch.clamp(ctx.occ.counts(), max=60).sum())


def test_synergy_prefetch_pays_once_and_selects_the_same(ctx):
    """The prefetch runs every budget's single and pair removals in two rounds of forwards; each K's
    rerank then runs none and keeps exactly what a rerank alone keeps."""
    from pie_lib.prune.patching import PatchEvaluator
    from pie_lib.prune.select import SynergyCache, synergy_prefetch

    s = fap_scores(ctx.occ, ctx.grads("replacement"), ctx.rows)
    cfg = SynergyConfig(seed=3, boundary_percent=50)
    ks = [5, 10, 20]

    def fresh():
        e = ctx.evaluator
        return PatchEvaluator(e.model, e.clt, e.batch, e.occ, e.rows, "corrupted", e.metric, e.clean_logits)

    alone = [synergy_rerank(fresh(), s, k, cfg) for k in ks]
    ev, cache = fresh(), SynergyCache()
    synergy_prefetch(ev, s, ks, cfg, cache)
    assert ev.n_forwards > 0
    paid = ev.n_forwards
    for k, want in zip(ks, alone):
        assert torch.equal(synergy_rerank(ev, s, k, cfg, cache=cache), want)
    assert ev.n_forwards == paid  # nothing left to run


def test_rank_cache_reuses_only_the_same_unmodified_scores(ctx):
    from pie_lib.prune.select import RankCache

    s = fap_scores(ctx.occ, ctx.grads("replacement"), ctx.rows)
    ranks = RankCache()
    a = ranks.by_prompt(ctx.occ, s)
    assert ranks.by_prompt(ctx.occ, s)[0] is a[0]  # a hit
    assert torch.equal(topk_global(ctx.occ, s, 7, ranks), topk_global(ctx.occ, s, 7))
    t = s.clone()
    t[0] = -1e9  # another object, then modified in place: both rank afresh
    assert torch.equal(ranks.by_prompt(ctx.occ, t)[1], rank_within(ctx.occ.prompt, t.abs())[1])
    s.neg_()
    try:
        assert ranks.by_prompt(ctx.occ, s)[0] is not a[0]
    finally:
        s.neg_()


def test_hash_uniform_is_batching_invariant():
    keys = torch.arange(1000)
    u = hash_uniform(3, keys)
    assert torch.equal(u[500:], hash_uniform(3, keys[500:]))
    assert 0.45 < float(u.mean()) < 0.55 and float(u.min()) >= 0 and float(u.max()) < 1
    assert not torch.equal(u, hash_uniform(4, keys))


def test_rank_within_groups():
    order, rank = rank_within(torch.tensor([1, 0, 1, 0]), torch.tensor([1.0, 2.0, 3.0, 2.0]))
    assert order.tolist() == [1, 3, 2, 0]
    assert rank.tolist() == [1, 0, 0, 1]


def test_zero_active_features(llama_world, tmp_path):
    import copy

    clt = copy.copy(llama_world.clt)
    clt.threshold = torch.full_like(llama_world.clt.threshold, 1e9)
    tok = tokenize_pairs(llama_world.model, llama_world.pairs[:2], batch_size=2)
    c = BatchContext(llama_world.model, clt, tok.batches[0], ScoringConfig())
    assert len(c.occ) == 0
    for m in get_methods("fap,fap-synergy,fap-signal,random,act-mag,clt-relp,factp,acdc"):
        keep, s = m.select(c, 5, 0, MethodParams())
        assert keep.numel() == 0
    ev = evaluate_keep_masks(c, torch.zeros(1, 0, dtype=torch.bool))
    # removing nothing is the clean run by definition, whatever the threads' rounding (it was 2.6e-8
    # with 4 torch threads when the forwards were run)
    assert torch.equal(ev["kl"], torch.zeros_like(ev["kl"]))
    assert torch.isnan(ev["faithfulness"]).all()


def test_sweep_determinism_resume_and_columns(llama_world, tmp_path):
    cfg = PruneConfig(
        model=str(llama_world.model_dir),
        clt=str(llama_world.clt_dir),
        data=str(llama_world.pairs_path),
        n=8,
        methods=["fap", "fap-synergy", "random"],
        k=[5, 20],
        k_frac=[0.25],
        seeds=[0, 1],
        out=str(tmp_path / "a"),
        batch_size=4,
        progress=False,
    )
    df = run_prune(cfg, model=llama_world.model, clt=llama_world.clt)
    for col in ["method", "k", "seed", "prompt_idx", "n_active", "kl", "pred_change", "faithfulness", "completeness"]:
        assert col in df.columns
    assert len(df) == 3 * 3 * 2 * 8
    assert (tmp_path / "a" / "results.parquet").exists()
    # the pair's identity is in every row: one data file = the same prompt under every seed
    from pie_lib.data.pairs import load_pairs
    from pie_lib.stats import summarize

    ids = [p.prompt_id() for p in load_pairs(llama_world.pairs_path, limit=8)]
    assert (df["prompt_id"] == df["prompt_idx"].map(dict(enumerate(ids)))).all() and len(set(ids)) == 8
    s = summarize(df[df["method"] == "random"], n_boot=0)
    assert (s["design"] == "shared prompts").all() and (s["basis"] == "prompt_id").all() and (s["n_prompts"] == 8).all()
    cfg2 = PruneConfig(**{**cfg.__dict__, "out": str(tmp_path / "b")})
    df2 = run_prune(cfg2, model=llama_world.model, clt=llama_world.clt)
    s1 = sorted(json.dumps(x, sort_keys=True) for x in load_selections(tmp_path / "a"))
    s2 = sorted(json.dumps(x, sort_keys=True) for x in load_selections(tmp_path / "b"))
    assert s1 == s2
    key = ["method", "budget", "k", "seed", "prompt_idx"]
    a = df.sort_values(key).reset_index(drop=True)
    b = df2.sort_values(key).reset_index(drop=True)
    np.testing.assert_array_equal(a["kl"].to_numpy(), b["kl"].to_numpy())
    # a selection keeps exactly min(K, n_active) occurrences with their scores
    for sel in load_selections(tmp_path / "a"):
        k = sel["k"] if sel["budget"] == "abs" else int(np.ceil(sel["k"] * sel["n_active"]))
        assert len(sel["occurrences"]) == min(k, sel["n_active"]) == len(sel["scores"])
        assert all(len(t) == 3 for t in sel["occurrences"])
    # rerun: nothing recomputed
    (tmp_path / "a" / "results.parquet").unlink()
    lines = (tmp_path / "a" / "results.jsonl").read_text().count("\n")
    run_prune(cfg, model=llama_world.model, clt=llama_world.clt)
    assert (tmp_path / "a" / "results.jsonl").read_text().count("\n") == lines
    # random differs across seeds, fap does not
    piv = df[df.k == 5].pivot_table(index=["method", "prompt_idx"], columns="seed", values="kl")
    assert np.allclose(piv.loc["fap"][0], piv.loc["fap"][1])
    assert not np.allclose(piv.loc["random"][0], piv.loc["random"][1])


def test_stale_atomic_write_temps_are_removed_on_rerun(llama_world, tmp_path):
    out = tmp_path / "o"
    cfg = PruneConfig(
        model=str(llama_world.model_dir),
        clt=str(llama_world.clt_dir),
        data=str(llama_world.pairs_path),
        n=2,
        methods=["fap"],
        k=[5],
        seeds=[0],
        out=str(out),
        batch_size=2,
        progress=False,
    )
    run_prune(cfg, model=llama_world.model, clt=llama_world.clt)
    stale = out / ".results.parquet.abc123"  # what a SIGKILL inside write_atomic leaves behind
    stale.write_bytes(b"half a parquet")
    run_prune(cfg, model=llama_world.model, clt=llama_world.clt)
    assert not stale.exists() and (out / "results.parquet").exists()


def test_median_is_numpys_bit_for_bit():
    from pie_lib.prune.select import median

    g = random.Random(0)
    for n in list(range(1, 12)) + [31, 32]:
        for _ in range(50):
            xs = [g.uniform(-1, 1) * 10 ** g.randint(-8, 3) for _ in range(n)]
            assert median(xs) == float(np.median(xs)), xs
    assert median([1.0, 3.0]) == 2.0 and median([5.0]) == 5.0
    assert math.isnan(median([1.0, float("nan"), 2.0]))
    # the two middle values' mean is (a + b) / 2 in float64, as numpy's
    a, b = 0.1, 0.2
    assert median([b, a]) == float(np.median([a, b])) == (a + b) / 2
