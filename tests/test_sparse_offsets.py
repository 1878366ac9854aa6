"""Sparse patch offsets (``SparseOffsets``): the rows a removal set writes, summed as the dense
offsets sum them, and subtracted in the forward with the same bits as the dense tensor.

Every comparison here is bitwise (``torch.equal`` of the float bits as integers, so a ``-0.0`` against
a ``0.0`` fails too): a sparse path that sums or subtracts in another order, drops a row or misses
one of the final-block positions fails these tests.
"""

from __future__ import annotations

import pytest
import torch
from conftest import patch_evaluator

import pie_lib.engine.traces as traces
from pie_lib.engine.traces import Prefix, SparseOffsets, clean_prefix_cache, patched_last_logits
from pie_lib.models.loading import load_model
from pie_lib.prune.context import BatchContext, ScoringConfig
from pie_lib.prune.occurrences import tokenize_pairs
from pie_lib.prune.patching import PatchEvaluator, Variants


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.view(torch.int32), b.view(torch.int32))


@pytest.fixture(scope="module", params=[("gpt2", "native"), ("llama", "native"), ("gemma2", "hf")])
def sctx(request, tiny_worlds, one_torch_thread):
    arch, backend = request.param
    w = tiny_worlds[arch]
    model = w.model if backend == "hf" else load_model(w.model_dir, device="cpu", backend=backend)
    tok = tokenize_pairs(model, w.pairs, batch_size=8)
    return BatchContext(model, w.clt, max(tok.batches, key=lambda b: b.size), ScoringConfig())


def _evaluator(ctx, reuse: bool, chunk: int | None = None) -> PatchEvaluator:
    return patch_evaluator(ctx, reuse, chunk)


def _same_spot_pairs(occ, same_layer: bool) -> torch.Tensor:
    """``[P, 2]`` pairs of occurrences of one prompt at one position (and one layer, or two layers)."""
    key = (occ.prompt * 10_000 + occ.pos).tolist()
    lay = occ.layer.tolist()
    out = []
    for i in range(len(key)):
        for j in range(i + 1, len(key)):
            if key[i] == key[j] and (lay[i] == lay[j]) == same_layer:
                out.append((i, j))
                break
    assert out, "the toy world has no such pair"
    return torch.tensor(out[:12])


def _pairs(occ, ab: torch.Tensor) -> Variants:
    n = ab.shape[0]
    return Variants(
        occ.prompt[ab[:, 0]], torch.arange(n).repeat_interleave(2), ab.flatten(), torch.zeros(n, dtype=torch.bool)
    )


def _picks(ctx) -> torch.Tensor:
    n = len(ctx.occ)
    return torch.randperm(n, generator=torch.Generator().manual_seed(0))[: min(n, 40)]


def _chained_pairs(ctx, picks: torch.Tensor, state: torch.Tensor) -> Variants:
    """Pairs (picks[i], picks[i + 1]) of one prompt, each starting from its first member's kept state
    (FAP-Synergy's M({c, p}) after M({c}))."""
    occ = ctx.occ
    ab = torch.stack([picks[:-1], picks[1:]], 1)
    same = (occ.prompt[ab[:, 0]] == occ.prompt[ab[:, 1]]).nonzero().squeeze(-1)
    pairs = _pairs(occ, ab[same])
    pairs.parent = state[same]
    return pairs


def _variants(ctx) -> Variants:
    """Singles at every position, pairs at one (position, layer), pairs at one position on two layers,
    every occurrence of one position (many writes summed into one row, where their order shows in the
    bits), a repeated entry, weighted entries, complements and an empty variant."""
    occ = ctx.occ
    picks = _picks(ctx)
    single = Variants.singles(occ.prompt[picks], picks)
    same = _pairs(occ, _same_spot_pairs(occ, same_layer=True))
    across = _pairs(occ, _same_spot_pairs(occ, same_layer=False))
    key = occ.prompt * 10_000 + occ.pos
    spots, counts = torch.unique(key, return_counts=True)
    assert int(counts.max()) >= 3
    top = spots[counts.argsort(descending=True)[:3]]  # the three most crowded (prompt, position)s
    members = (key[:, None] == top[None]).nonzero()  # [M, 2]: (occurrence, which of them)
    crowds = Variants(top // 10_000, members[:, 1], members[:, 0], torch.zeros(3, dtype=torch.bool))
    twice = Variants(occ.prompt[[int(picks[0])]], torch.tensor([0, 0]), picks[[0, 0]], torch.tensor([False]))
    half = Variants(
        occ.prompt[picks[:6]],
        torch.arange(6),
        picks[:6],
        torch.zeros(6, dtype=torch.bool),
        weight=torch.full((6,), 0.3),
    )
    comp = Variants(occ.prompt[picks[:4]], torch.arange(4), picks[:4], torch.ones(4, dtype=torch.bool))
    empty = Variants(
        torch.tensor([0]), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), torch.tensor([False])
    )
    return Variants.concat([single, same, across, crowds, twice, half, comp, empty])


def test_sparse_rows_are_the_dense_offsets_bits(sctx):
    """sparse_offsets(...).dense() equals offsets(...) bit for bit, whole prompts and suffixes; it is
    None exactly where a layer sums by the dense matmul."""
    ev, occ = sctx.evaluator, sctx.occ
    v = _variants(sctx)
    plain = ~v.complement[v.var]
    var, ent, w = v.var[plain], v.occ[plain], None
    checked = 0
    for start in (0, 2, int(occ.pos.max())):
        keep = occ.pos[ent] >= start
        args = (var[keep], ent[keep], w, v.n, start)
        dense = ev.offsets(*args)
        sp = ev.sparse_offsets(*args)
        if sp is None:
            assert any(lw.dense for lw in ev._layer_writes(*args))
            continue
        assert sp.positions == sctx.batch.seq_len - start and sp.batch == v.n
        assert _bits_equal(sp.dense(), dense)
        # only rows some entry writes: at most one per (entry, target layer)
        assert sum(int(i.numel()) for i in sp.idx) <= int(keep.sum()) * sctx.clt.n_layers
        checked += 1
    assert checked
    weight = torch.rand(ent.numel(), generator=torch.Generator().manual_seed(1))
    sp = ev.sparse_offsets(var, ent, weight, v.n)
    assert sp is not None and _bits_equal(sp.dense(), ev.offsets(var, ent, weight, v.n))
    # many entries per (variant, position): the dense matmul sums them, the sparse path declines
    crowd = torch.arange(len(occ)).repeat(8 * sctx.batch.seq_len)
    assert ev.sparse_offsets(torch.zeros_like(crowd), crowd, None, 1) is None


def test_take_and_final_positions_match_dense_slices():
    g = torch.Generator().manual_seed(4)
    L, B, P, D = 3, 4, 5, 6
    dense = torch.zeros(L, B, P, D)
    mask = torch.rand(L, B, P, generator=g) < 0.3
    dense[mask] = torch.randn(int(mask.sum()), D, generator=g)
    idx = [m.flatten().nonzero().squeeze(-1) for m in mask]
    sp = SparseOffsets(idx, [dense[j].reshape(-1, D)[idx[j]] for j in range(L)], B, P, D)
    assert _bits_equal(sp.dense(), dense)
    rep = torch.tensor([2, 0, 3, 3, 3, 1])
    assert _bits_equal(sp.take(rep).dense(), dense[:, rep])
    for last in (1, 2, P):
        i, r = sp.layer_rows(L - 1, last)
        cut = torch.zeros(B * last, D)
        cut[i] = r
        assert _bits_equal(cut.view(B, last, D), dense[L - 1][:, -last:])


@pytest.mark.parametrize("reuse", [True, False])
def test_patch_forwards_are_the_dense_forwards_bits(sctx, reuse, monkeypatch):
    """The same variants run with sparse offsets and with dense ones (sparse_offsets forced to None)
    give bit-identical metrics, KLs and argmax changes: prefix-reuse and whole-prompt forwards,
    chunks of 1-3 sequences (padded to 4), kept states and pairs started from them, and, on the native
    models, final blocks cut to their last positions."""
    v = _variants(sctx)
    sparse_seen: list[bool] = []
    final_seen: list[int] = []
    real_layer_offsets, real_final_rows = traces._layer_offsets, traces._final_rows

    def spy_offsets(off, layers, final):
        out = real_layer_offsets(off, layers, final)
        sparse_seen.append(out[1])
        return out

    def spy_final(model, batch, q_len):
        final_seen.append(real_final_rows(model, batch, q_len))
        return final_seen[-1]

    monkeypatch.setattr(traces, "_layer_offsets", spy_offsets)
    monkeypatch.setattr(traces, "_final_rows", spy_final)
    outcomes = {}
    for mode in ("sparse", "dense"):
        if mode == "dense":
            monkeypatch.setattr(PatchEvaluator, "sparse_offsets", lambda self, *a, **k: None)
        got = []
        picks = _picks(sctx)
        for chunk in (1, 3, None):
            ev = _evaluator(sctx, reuse, chunk)
            res = ev.run(v)
            got += [res.metric, res.kl, res.pred_change]
            if reuse:  # kept states of the singles, and pairs that start from them
                kept = ev.run(Variants.singles(sctx.occ.prompt[picks], picks), retain=True)
                assert kept.state is not None and bool((kept.state >= 0).all())
                pr = ev.run(_chained_pairs(sctx, picks, kept.state[:-1]))
                got += [kept.metric, pr.metric, pr.kl, pr.pred_change]
        outcomes[mode] = got
        if mode == "sparse":
            assert any(sparse_seen), "no forward took the sparse path"
    assert not all(sparse_seen), "the dense forwards were sparse too"
    assert len(outcomes["sparse"]) == len(outcomes["dense"])
    for a, b in zip(outcomes["sparse"], outcomes["dense"]):
        assert torch.equal(a, b) if a.dtype == torch.bool else _bits_equal(a, b)
    if sctx.model.backend == "native":
        assert any(n > 0 for n in final_seen), "no forward cut its final block"


def test_engine_forwards_take_sparse_offsets_bitwise(sctx):
    """patched_last_logits with random sparse offsets equals it with their dense tensor, bit for bit:
    whole prompts, clean prefixes from several layers, 1 and 5 sequences."""
    model = sctx.model
    ids = sctx.batch.clean_ids
    B, T = ids.shape
    L, D = model.n_layers, model.d_model
    cache = clean_prefix_cache(model, ids)
    g = torch.Generator().manual_seed(7)
    for n in (1, min(B, 5)):
        for start, layer in ((0, 0), (2, 1), (T - 2, 0), (T - 1, L - 2)):
            if start > 0 and traces.exact_suffix_start(T, start, model.pads_short_query_blocks, n) != start:
                continue
            P = T - start
            mask = torch.rand(L, n, P, generator=g) < 0.2
            mask[:layer] = False
            mask[L - 1, :, -1] = True  # the last position of the last layer (final-block rows)
            idx = [m.flatten().nonzero().squeeze(-1) for m in mask]
            rows = [torch.randn(int(i.numel()), D, generator=g) * 0.1 for i in idx]
            sp = SparseOffsets(idx, rows, n, P, D)
            prefix = Prefix(cache, torch.arange(n), start, layer) if start or layer else None
            want, _ = patched_last_logits(model, ids[:n], sp.dense(), prefix=prefix)
            got, _ = patched_last_logits(model, ids[:n], sp, prefix=prefix)
            assert _bits_equal(got, want), (n, start, layer)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_subtract_rows_is_the_dense_subtraction(dtype):
    """subtract_rows equals ``h - dense`` bit for bit, signed zeros included, in place or on a copy
    (a non-contiguous ``h``), with float32 rows cast to ``h``'s dtype as the dense offsets are."""
    from pie_lib.engine.rules import subtract_rows

    g = torch.Generator().manual_seed(5)
    B, P, D = 3, 7, 16
    h = torch.randn(B, P, D, generator=g).to(dtype)
    h[0, 0, :4] = -0.0
    idx = torch.tensor([0, 5, 9, 20])
    rows = torch.randn(4, D, generator=g)
    rows[1, :3] = -0.0  # h - (-0.0) turns a -0.0 into +0.0: the written rows must do it too
    h[0, 5, :3] = -0.0
    dense = torch.zeros(B * P, D)
    dense[idx] = rows
    want = h - dense.view(B, P, D).to(dtype)
    as_int = torch.int16 if dtype != torch.float32 else torch.int32
    assert torch.equal(subtract_rows(h.clone(), idx, rows).view(as_int), want.view(as_int))
    strided = h.transpose(0, 1).contiguous().transpose(0, 1)  # same values, not contiguous
    before = strided.clone()
    assert torch.equal(subtract_rows(strided, idx, rows).view(as_int), want.view(as_int))
    assert torch.equal(strided.view(as_int), before.view(as_int))  # a copy was written, not the input


def test_complement_chunks_are_the_dense_offsets_bits(sctx):
    """A chunk holding complements gets dense offsets written from the null's rows and the listed
    entries' sparse rows: bit for bit the dense path's ``where(comp, null - off, off)``, for chunks of
    complements only and of complements mixed with plain sets (whose rows must stay their own)."""
    ev = sctx.evaluator
    v = _variants(sctx)
    order = torch.argsort(v.var, stable=True)
    var_sorted = v.var[order]
    comp_at = v.complement.nonzero().squeeze(-1)
    lo_c, hi_c = int(comp_at.min()), int(comp_at.max()) + 1
    for lo, hi in ((0, v.n), (lo_c, hi_c), (lo_c - 3, hi_c + 1)):
        ids, fast, _ = ev._prepare_range(v, order, var_sorted, lo, hi, None, sparse=True)
        ids_d, slow, _ = ev._prepare_range(v, order, var_sorted, lo, hi, None)
        assert isinstance(fast, torch.Tensor) and isinstance(slow, torch.Tensor)
        assert torch.equal(ids, ids_d) and _bits_equal(fast, slow), (lo, hi)
