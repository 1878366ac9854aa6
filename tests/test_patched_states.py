"""Patch forwards that start from an earlier patched forward's keys and values (``retain`` / ``parent``).

A variant whose removals agree with a kept state's before position t sees, before t, exactly that
state's keys and values; starting there changes the work, never an outcome.
"""

from __future__ import annotations

import pytest
import torch
from conftest import patch_evaluator

from pie_lib.models.loading import load_model
from pie_lib.prune.context import BatchContext, ScoringConfig
from pie_lib.prune.occurrences import tokenize_pairs
from pie_lib.prune.patching import PatchEvaluator, Variants


@pytest.fixture(scope="module", params=["gpt2-native", "gpt2-hf", "llama-native", "gemma2-native"])
def ctx(request, tiny_worlds, one_torch_thread):
    arch, backend = request.param.split("-")
    w = tiny_worlds[arch]
    model = w.model if backend == "hf" else load_model(w.model_dir, device="cpu", backend="native")
    tok = tokenize_pairs(model, w.pairs, batch_size=8)
    return BatchContext(model, w.clt, max(tok.batches, key=lambda b: b.size), ScoringConfig())


def _evaluator(ctx, chunk: int | None = None) -> PatchEvaluator:
    return patch_evaluator(ctx, True, chunk)


def _apart_pairs(ctx, n: int = 40, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(earlier, later) occurrence pairs of one prompt at different positions, later not first."""
    occ = ctx.occ
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(len(occ), (200 * n,), generator=g)
    b = torch.randint(len(occ), (200 * n,), generator=g)
    ok = (occ.prompt[a] == occ.prompt[b]) & (occ.pos[a] < occ.pos[b])
    return a[ok][:n], b[ok][:n]


def _pairs(ctx, a, b, parent=None) -> Variants:
    V = a.numel()
    return Variants(
        ctx.occ.prompt[a], torch.arange(V).repeat_interleave(2), torch.stack([a, b], 1).flatten(),
        torch.zeros(V, dtype=torch.bool), parent=parent,
    )  # fmt: skip


def _exact(ctx) -> bool:
    """Bitwise where every suffix rounds as the whole prompt (native padding models); else to rounding."""
    return bool(ctx.model.pads_short_query_blocks)


def _same(got, want, exact: bool) -> None:
    if exact:
        assert torch.equal(got.metric, want.metric) and torch.equal(got.kl, want.kl)
    else:
        torch.testing.assert_close(got.metric, want.metric, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got.kl, want.kl, rtol=1e-5, atol=1e-7)
    assert torch.equal(got.pred_change, want.pred_change)


def test_pairs_from_their_earlier_member_give_the_same_outcomes(ctx):
    a, b = _apart_pairs(ctx)
    assert a.numel() >= 5, "premise: the toy batch has pairs at different positions"
    plain = _evaluator(ctx)
    want = plain.run(_pairs(ctx, a, b))
    ev = _evaluator(ctx, chunk=7)  # several chunks: states of one forward serve variants of others
    singles = ev.run(Variants.singles(ctx.occ.prompt[a], a), retain=True)
    assert singles.state is not None and bool((singles.state >= 0).all())
    before = ev.n_positions
    got = ev.run(_pairs(ctx, a, b, parent=singles.state))
    _same(got, want, _exact(ctx))
    # the pairs ran from the later member's position: fewer positions than from the clean prefix
    assert ev.n_positions - before < plain.n_positions
    # and a single's own outcome is unchanged by keeping its state
    _same(singles, plain.run(Variants.singles(ctx.occ.prompt[a], a)), _exact(ctx))


def test_circuits_from_the_null_give_the_same_outcomes(ctx):
    occ, B, T = ctx.occ, ctx.batch.size, ctx.batch.seq_len
    kept = occ.pos >= T - 3  # late kept occurrences: the circuits agree with the null well into the prompt
    mine = kept[None] & (occ.prompt[None] == torch.arange(B)[:, None])  # [B, N]
    var, o = mine.nonzero(as_tuple=True)
    plain = _evaluator(ctx)
    want = plain.run(Variants(torch.arange(B), var, o, torch.ones(B, dtype=torch.bool)))
    ev = _evaluator(ctx)
    empty = torch.zeros(0, dtype=torch.long)
    null = ev.run(Variants(torch.arange(B), empty, empty, torch.ones(B, dtype=torch.bool)), retain=True)
    assert null.state is not None
    before = ev.n_positions
    got = ev.run(Variants(torch.arange(B), var, o, torch.ones(B, dtype=torch.bool), parent=null.state))
    _same(got, want, _exact(ctx))
    assert ev.n_positions - before < plain.n_positions


def test_where_a_variant_first_differs_from_its_parent(ctx):
    occ, T = ctx.occ, ctx.batch.seq_len
    ev = _evaluator(ctx)
    a, b = _apart_pairs(ctx, n=3)
    empty = torch.zeros(0, dtype=torch.long)
    p0 = int(occ.prompt[a[0]])
    parents = Variants.concat(
        [
            Variants.singles(occ.prompt[a[:1]], a[:1]),  # a0 removed
            Variants(torch.tensor([p0]), empty, empty, torch.tensor([True])),  # the null of a0's prompt
        ]
    )
    st = ev.run(parents, retain=True).state
    assert st is not None and sorted(st.tolist()) == [0, 1]
    s_single, s_null = st.tolist()
    first_active = int(occ.pos[occ.prompt == p0].min())
    kids = Variants.concat(
        [
            _pairs(ctx, a[:1], b[:1]),  # {a0, b0} vs {a0}: differs at b0
            Variants.singles(occ.prompt[a[:1]], a[:1]),  # identical to state 0: nowhere
            Variants(occ.prompt[a[:1]], torch.tensor([0]), a[:1], torch.tensor([False]), torch.tensor([0.5])),
            Variants(occ.prompt[b[:1]], torch.tensor([0]), b[:1], torch.tensor([True])),  # kept {b0} vs null
            Variants(occ.prompt[b[:1]], torch.tensor([0]), b[:1], torch.tensor([False])),  # plain vs complement
        ]
    )
    kids.parent = torch.tensor([s_single, s_single, s_single, s_null, s_null])
    got = ev._diverge(kids).tolist()
    assert got == [int(occ.pos[b[0]]), T, int(occ.pos[a[0]]), int(occ.pos[b[0]]), first_active]
    other = [i for i in range(len(occ)) if int(occ.prompt[i]) != p0][0]
    stray = Variants(occ.prompt[[other]], torch.tensor([0]), torch.tensor([other]), torch.tensor([False]))
    stray.parent = torch.tensor([s_single])
    with pytest.raises(ValueError, match="another prompt"):
        ev._diverge(stray)
    ev.release_states()
    assert ev.states is None


def test_no_room_for_states_keeps_none_and_changes_nothing(ctx):
    a, b = _apart_pairs(ctx)
    ev = _evaluator(ctx)
    ev.state_fraction = 1e-15  # room for no state: a budget of a few bytes
    singles = ev.run(Variants.singles(ctx.occ.prompt[a], a), retain=True)
    assert singles.state is not None and bool((singles.state == -1).all()) and ev.states is None
    got = ev.run(_pairs(ctx, a, b, parent=singles.state))
    _same(got, _evaluator(ctx).run(_pairs(ctx, a, b)), _exact(ctx))


def test_room_for_some_states_keeps_the_first_and_their_exact_keys(ctx, monkeypatch):
    """With room for 3 states the first 3 retained variants (in forward order) keep theirs, the rest
    none; the kept keys and values are those of a run with room for all, and pairs still come out
    the same."""
    a, b = _apart_pairs(ctx)
    full = _evaluator(ctx, chunk=7)
    all_kept = full.run(Variants.singles(ctx.occ.prompt[a], a), retain=True)
    assert all_kept.state is not None and full.states is not None
    per_seq = sum(k[0].numel() * k.element_size() + v[0].numel() * v.element_size() for k, v in full.states.kv)
    ev = _evaluator(ctx, chunk=7)
    monkeypatch.setattr(ev, "_state_budget", lambda: 3 * per_seq + per_seq // 2)
    some = ev.run(Variants.singles(ctx.occ.prompt[a], a), retain=True)
    assert some.state is not None and ev.states is not None and ev.states.n == 3
    got = some.state >= 0
    assert int(got.sum()) == 3 and torch.equal(some.state[got].sort().values, torch.arange(3))
    for (k, v), (fk, fv) in zip(ev.states.kv, full.states.kv):  # the same variants' keys and values
        assert torch.equal(k[some.state[got]], fk[all_kept.state[got]])
        assert torch.equal(v[some.state[got]], fv[all_kept.state[got]])
    _same(ev.run(_pairs(ctx, a, b, parent=some.state)), _evaluator(ctx).run(_pairs(ctx, a, b)), _exact(ctx))


def test_states_need_prefix_reuse(ctx):
    """Whole-prompt evaluators (remote, logsumexp, or reuse off) keep no state: result.state is None."""
    ev = PatchEvaluator(
        ctx.model, ctx.clt, ctx.batch, ctx.occ, ctx.rows, "corrupted", "logit_diff", ctx.evaluator.clean_logits,
        reuse_prefix=False,
    )  # fmt: skip
    res = ev.run(Variants.singles(ctx.occ.prompt[:3], torch.arange(3)), retain=True)
    assert res.state is None and ev.states is None


def test_outcomes_are_bitwise_the_same_whatever_the_chunk(tiny_worlds, one_torch_thread):
    """Forwards of 1-3 sequences are padded to 4 on a CPU (torch's matmul rounds 1-3 rows otherwise):
    a variant's outcome does not depend, even in its last bits, on how many share its forward."""
    w = tiny_worlds["gpt2"]
    model = load_model(w.model_dir, device="cpu", backend="native")
    tok = tokenize_pairs(model, w.pairs, batch_size=8)
    c = BatchContext(model, w.clt, max(tok.batches, key=lambda b: b.size), ScoringConfig())
    pick = torch.randperm(len(c.occ), generator=torch.Generator().manual_seed(4))[:24]
    v = Variants.singles(c.occ.prompt[pick], pick)
    want = _evaluator(c, chunk=64).run(v)
    for chunk in (1, 2, 3, 5):
        got = _evaluator(c, chunk=chunk).run(v)
        assert torch.equal(got.metric, want.metric) and torch.equal(got.kl, want.kl), chunk


def test_no_states_where_the_mmap_threshold_is_pinned(ctx, monkeypatch):
    """A process that pins glibc's mmap threshold (big CPU models) keeps no states: they made its
    resident set creep from prompt to prompt. Outcomes are the same either way."""
    import pie_lib.prune.patching as patching

    monkeypatch.setattr(patching, "mmap_threshold_pinned", lambda: True)
    a, b = _apart_pairs(ctx)
    ev = _evaluator(ctx)
    assert ev.state_fraction == 0.0
    singles = ev.run(Variants.singles(ctx.occ.prompt[a], a), retain=True)
    assert singles.state is None and ev.states is None
    _same(ev.run(_pairs(ctx, a, b)), _evaluator(ctx).run(_pairs(ctx, a, b)), _exact(ctx))
