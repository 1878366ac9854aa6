"""Patch forwards: identical variants run once, chunk sizing, results independent of the chunk."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from conftest import patch_evaluator

from pie_lib.prune.context import BatchContext, ScoringConfig
from pie_lib.prune.occurrences import tokenize_pairs
from pie_lib.prune.patching import CPU_TOKENS_PER_FORWARD, Variants, _unique_variants, auto_chunk


@pytest.fixture(scope="module")
def ctx(llama_world):
    tok = tokenize_pairs(llama_world.model, llama_world.pairs, batch_size=3)
    return BatchContext(llama_world.model, llama_world.clt, tok.batches[0], ScoringConfig())


def _variants(ctx):
    """Singles, a pair, and exact duplicates of some of them (one with its entries reordered)."""
    occ = ctx.occ
    n = len(occ)
    picks = torch.tensor([0, n // 3, n // 2, n - 1])
    single = Variants.singles(occ.prompt[picks], picks)
    a, b = int(picks[1]), int(picks[2])
    same_prompt = [i for i in range(n) if int(occ.prompt[i]) == int(occ.prompt[a])][:2]
    pair = Variants(
        occ.prompt[[same_prompt[0]]], torch.tensor([0, 0]), torch.tensor(same_prompt), torch.tensor([False])
    )
    pair_rev = Variants(
        occ.prompt[[same_prompt[0]]], torch.tensor([0, 0]), torch.tensor(same_prompt[::-1]), torch.tensor([False])
    )
    comp = Variants(occ.prompt[[a]], torch.tensor([0]), torch.tensor([a]), torch.tensor([True]))
    return Variants.concat([single, pair, comp, single, pair_rev, comp]), b


def test_duplicates_run_once_and_give_the_same_outcomes(ctx):
    v, _ = _variants(ctx)
    uniq, inverse = _unique_variants(v)
    assert uniq is not None and uniq.n == 6 and v.n == 12
    assert inverse.tolist() == [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5]
    before = ctx.evaluator.n_sequences
    res = ctx.evaluator.run(v)
    assert ctx.evaluator.n_sequences - before == 6
    torch.testing.assert_close(res.metric[:6], res.metric[6:], rtol=0, atol=0)
    # each distinct variant alone gives the same numbers
    for j in range(6):
        one = ctx.evaluator.run(
            Variants(
                uniq.prompt[[j]],
                torch.zeros(int((uniq.var == j).sum()), dtype=torch.long),
                uniq.occ[uniq.var == j],
                uniq.complement[[j]],
            )
        )
        torch.testing.assert_close(one.metric[0], res.metric[j], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(one.kl[0], res.kl[j], rtol=1e-4, atol=1e-6)


def test_outcomes_do_not_depend_on_the_chunk(ctx):
    v, _ = _variants(ctx)
    outs = []
    for chunk in (1, 5, 64):
        ctx.evaluator.chunk = chunk
        outs.append(ctx.evaluator.run(v))
    for o in outs[1:]:
        torch.testing.assert_close(o.metric, outs[0].metric, rtol=1e-5, atol=1e-5)
        assert torch.equal(o.pred_change, outs[0].pred_change)


def test_auto_chunk_follows_memory_and_length(ctx, monkeypatch):
    import pie_lib.prune.patching as patching

    m = ctx.model
    assert auto_chunk(m, 10) == min(4096, CPU_TOKENS_PER_FORWARD // 10)  # CPU: the token cap binds
    assert auto_chunk(m, 40) == CPU_TOKENS_PER_FORWARD // 40
    monkeypatch.setattr(patching, "available_memory_bytes", lambda dev: 1 << 20)  # 1 MiB free
    small = auto_chunk(m, 10)
    assert 1 <= small < CPU_TOKENS_PER_FORWARD // 10
    monkeypatch.setattr(patching, "available_memory_bytes", lambda dev: 0)
    assert auto_chunk(m, 10) == 1


def test_vs_reference_skips_without_the_reference(tmp_path, capsys):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import vs_reference

    rc = vs_reference.main(["--reference-python", str(tmp_path / "no-python"), "--work", str(tmp_path / "w")])
    assert rc == 0
    out = capsys.readouterr().out
    assert out.startswith("SKIPPED: the reference implementation is not installed")
    assert not (tmp_path / "w").exists()


# ------------------------------------------------------------------ prefix reuse
@pytest.fixture(scope="module", params=["gpt2", "llama", "gemma2"])
def arch_ctx(request, tiny_worlds, one_torch_thread):
    w = tiny_worlds[request.param]
    tok = tokenize_pairs(w.model, w.pairs, batch_size=8)
    return BatchContext(w.model, w.clt, max(tok.batches, key=lambda b: b.size), ScoringConfig())


def _mixed_variants(ctx):
    """Singles at every position, pairs, complements, weighted entries and an empty variant."""
    occ = ctx.occ
    n = len(occ)
    g = torch.Generator().manual_seed(0)
    picks = torch.randperm(n, generator=g)[: min(n, 40)]
    single = Variants.singles(occ.prompt[picks], picks)
    a, b = picks[:10], picks[10:20]
    same = occ.prompt[a] == occ.prompt[b]
    a, b = a[same], b[same]
    pair = Variants(
        occ.prompt[a],
        torch.arange(a.numel()).repeat_interleave(2),
        torch.stack([a, b], 1).flatten(),
        torch.zeros(a.numel(), dtype=torch.bool),
    )
    comp = Variants(occ.prompt[picks[:6]], torch.arange(6), picks[:6], torch.ones(6, dtype=torch.bool))
    half = Variants(
        occ.prompt[picks[:6]],
        torch.arange(6),
        picks[:6],
        torch.zeros(6, dtype=torch.bool),
        weight=torch.full((6,), 0.5),
    )
    empty = Variants(
        torch.tensor([0]), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), torch.tensor([False])
    )
    return Variants.concat([single, pair, comp, half, empty])


def _evaluator(ctx, reuse: bool, chunk: int | None = None):
    return patch_evaluator(ctx, reuse, chunk)


def test_prefix_reuse_gives_the_whole_prompt_bits(arch_ctx):
    """Forwards from the clean prefix give the whole-prompt forwards' metric, KL and argmax (to rounding:
    bitwise on the toy worlds here, but small matmuls may round by row count, as chunks already do)."""
    v = _mixed_variants(arch_ctx)
    whole, fast = _evaluator(arch_ctx, False), _evaluator(arch_ctx, True, chunk=7)
    a, b = whole.run(v), fast.run(v)
    torch.testing.assert_close(b.metric, a.metric, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(b.kl, a.kl, rtol=1e-5, atol=1e-7)
    assert torch.equal(a.pred_change, b.pred_change)
    assert fast.n_positions < whole.n_positions  # it did skip clean prefixes
    # a shared base state (ACDC's extra offsets) moves the first changed position too
    base = whole.offsets(v.prompt[:0], torch.zeros(0, dtype=torch.long), None, arch_ctx.batch.size)
    base[:, :, -3:] = 0.01
    base[:2, 0] = 0  # prompt 0: nothing below layer 2 (its first layer differs from the others')
    pick = torch.randperm(len(arch_ctx.occ), generator=torch.Generator().manual_seed(3))[:30]  # every prompt
    singles = Variants.singles(arch_ctx.occ.prompt[pick], pick)
    a, b = whole.run(singles, extra_offsets=base), fast.run(singles, extra_offsets=base)
    torch.testing.assert_close(b.metric, a.metric, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(b.kl, a.kl, rtol=1e-5, atol=1e-6)  # KLs near 0 are rounding noise


def test_exact_suffix_start_matches_whole_prompt_forwards(arch_ctx):
    """Every start the rule allows, from every layer, gives the whole-prompt forward's logits, to rounding."""
    from pie_lib.engine.traces import Prefix, exact_suffix_start, patched_last_logits

    ctx = arch_ctx
    ev = _evaluator(ctx, True)
    ids = ctx.batch.clean_ids
    B, T = ids.shape
    g = torch.Generator().manual_seed(1)
    for first in range(1, T + 1):
        start = exact_suffix_start(T, first)
        assert 0 <= start <= min(first, T - 1)
        off = torch.randn(ctx.model.n_layers, B, T, ctx.model.d_model, generator=g) * 0.1
        off[:, :, :first] = 0
        for layer in range(ctx.model.n_layers):  # nothing patched below `layer`: layers 0..layer are skipped
            off[:layer] = 0
            want, _ = patched_last_logits(ctx.model, ids, off)
            prefix = Prefix(ev.prefix_cache(), torch.arange(B), start, layer)
            got, _ = patched_last_logits(ctx.model, ids, off[:, :, start:], prefix=prefix)
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_exact_suffix_start_rule():
    from pie_lib.engine.traces import exact_suffix_start

    assert [exact_suffix_start(15, t) for t in (0, 1, 11, 12, 14, 15, 99)] == [0, 1, 11, 11, 11, 11, 11]
    assert exact_suffix_start(40, 38) == 36  # a 2-row tail block would round differently: 4 rows
    assert exact_suffix_start(34, 33) == 0 and exact_suffix_start(33, 20) == 0  # the whole prompt has a short tail
    assert exact_suffix_start(300, 200) == 0  # another query block size: whole prompts


def test_prefix_reuse_keeps_synergy_selections(arch_ctx):
    """FAP-Synergy's keep masks are the same with and without prefix reuse."""
    from pie_lib.prune.scores import fap_scores
    from pie_lib.prune.select import SynergyConfig, synergy_rerank

    ctx = arch_ctx
    scores = fap_scores(ctx.occ, ctx.grads("replacement"), ctx.rows)
    for k in (3, 6):
        masks = [
            synergy_rerank(_evaluator(ctx, reuse), scores, k, SynergyConfig(boundary_percent=50))
            for reuse in (False, True)
        ]
        assert torch.equal(masks[0], masks[1])


def test_prefix_reuse_is_local_and_logit_diff_only(arch_ctx):
    from pie_lib.errors import SettingError
    from pie_lib.prune.patching import PatchEvaluator

    ctx = arch_ctx
    lse = PatchEvaluator(
        ctx.model, ctx.clt, ctx.batch, ctx.occ, ctx.rows, "corrupted", "logsumexp", ctx.evaluator.clean_logits
    )
    assert lse.reuse_prefix is False and ctx.evaluator.reuse_prefix is True
    with pytest.raises(SettingError, match="logit_diff"):
        PatchEvaluator(
            ctx.model,
            ctx.clt,
            ctx.batch,
            ctx.occ,
            ctx.rows,
            "corrupted",
            "logsumexp",
            ctx.evaluator.clean_logits,
            reuse_prefix=True,
        )


def test_a_chunk_set_by_hand_holds_for_suffix_forwards(ctx):
    ev = _evaluator(ctx, True)
    assert ev.auto_chunk
    ev.chunk = 3
    before = ev.n_forwards
    v = Variants.singles(ctx.occ.prompt[:9], torch.arange(9))
    ev.run(v)
    assert not ev.auto_chunk and ev.n_forwards - before >= 3


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_exact_suffix_start_over_prompt_lengths(tiny_worlds, one_torch_thread, arch):
    """Lengths around SDPA's 32-row query blocks: every allowed start rounds as the whole prompt."""
    from pie_lib.engine.traces import Prefix, clean_prefix_cache, exact_suffix_start, patched_last_logits

    model = tiny_worlds[arch].model
    g = torch.Generator().manual_seed(2)
    for T in (15, 31, 32, 33, 34, 36, 40, 64, 66, 70):
        ids = torch.randint(3, model.vocab_size, (3, T), generator=g)
        cache = clean_prefix_cache(model, ids)
        for first in sorted({1, 2, T // 2, T - 5, T - 4, T - 3, T - 2, T - 1, T} - {0}):
            start = exact_suffix_start(T, first)
            if start == 0:
                continue
            off = torch.randn(model.n_layers, 3, T, model.d_model, generator=g) * 0.1
            off[:, :, :first] = 0
            want, _ = patched_last_logits(model, ids, off)
            got, _ = patched_last_logits(model, ids, off[:, :, start:], prefix=Prefix(cache, torch.arange(3), start))
            # rounding level: small matmuls may take another kernel path for another row count
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6, msg=lambda m: f"T={T} start={start}: {m}")


def test_final_block_cut_leaves_pie_prune_unchanged(tmp_path, monkeypatch, one_torch_thread):
    """pie prune on the native toy GPT-2 with the patch forwards' final block cut to its last
    positions (``final_block_positions``) gives the same selections and every number bit for bit
    as with whole final blocks."""
    import pie_lib.engine.traces as traces
    from pie_lib.prune.sweep import PruneConfig, load_results, load_selections, run_prune

    real = traces._final_rows
    cut: list[int] = []

    def spy(model, batch, q_len):
        cut.append(real(model, batch, q_len))
        return cut[-1]

    outs = {}
    for name, rows in (("whole", lambda *a: 0), ("cut", spy)):
        monkeypatch.setattr(traces, "_final_rows", rows)
        cfg = PruneConfig(
            model="toy:gpt2",
            clt="toy:gpt2",
            task="ioi",
            n=4,
            data_seed=0,
            methods=["fap", "fap-synergy"],
            k=[4, 12],
            k_frac=[],
            seeds=[0],
            out=str(tmp_path / name),
            device="cpu",
            batch_size=4,
            progress=False,
        )
        run_prune(cfg)
        res = load_results(tmp_path / name).drop(columns=["seconds"]).sort_values(["method", "k", "seed", "prompt_idx"])
        sels = sorted(load_selections(tmp_path / name), key=lambda r: (r["method"], r["k"], r["seed"], r["prompt_idx"]))
        outs[name] = (res.reset_index(drop=True), sels)
    assert sum(n > 0 for n in cut) >= 5  # the cut run did cut
    assert outs["cut"][1] == outs["whole"][1]
    assert outs["cut"][0].equals(outs["whole"][0])
