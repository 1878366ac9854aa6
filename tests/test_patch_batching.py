"""Patch forwards: identical variants run once, chunk sizing, results independent of the chunk."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

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
