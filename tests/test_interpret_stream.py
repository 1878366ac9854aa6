"""Streaming example store (the default): running top lists, reservoirs and a context sample per
feature, against records mode, and what ``pie evaluate`` samples from it."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from pie_lib.errors import ConfigMismatchError, DataFormatError
from pie_lib.evaluate.sampling import fade_sample, fade_sample_weighted, pie_sample, pie_sample_held
from pie_lib.interpret.corpus import CorpusConfig
from pie_lib.interpret.examples import (
    ActivationStore,
    ExampleConfig,
    NaturalActs,
    StreamingExamples,
    batch_activations,
    context_sample,
    features_by_layer,
    pad_id_of,
)

FEATURES = [(0, 1), (0, 5), (1, 3), (2, 7), (2, 40)]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _build(world, root, store, n_docs=60, **kw):
    _, _, lm, clt = world
    kw = {"batch_size": 16, "n_top": 5, "n_quantile_bins": 2, "n_per_quantile": 2, "eval_top": 8, **kw}
    ecfg = ExampleConfig(store=store, **kw)
    return ActivationStore.build(
        lm, clt, FEATURES, root, CorpusConfig(n_docs=n_docs), ecfg, {"m": "tiny"}, progress=False
    ), ecfg


def test_default_is_stream_and_bad_settings_are_one_line():
    assert ExampleConfig().store == "stream"
    with pytest.raises(DataFormatError, match="--eval-top"):
        ExampleConfig(n_top=50, eval_top=10).check()
    with pytest.raises(DataFormatError, match="'stream'"):
        ExampleConfig(store="dense").check()
    ExampleConfig(n_top=50, eval_top=10, store="records").check()  # records mode keeps no eval_top list


def test_stream_matches_records_on_top_examples_stats_and_dense(interp_world, tmp_path):
    rec, ecfg = _build(interp_world, tmp_path / "rec", "records")
    st, scfg = _build(interp_world, tmp_path / "st", "stream")
    a, b = rec.feature_stats(FEATURES), st.feature_stats(FEATURES)
    assert (a["n_active"].to_numpy() == b["n_active"].to_numpy()).all()
    assert np.allclose(a["max_act"].to_numpy(), b["max_act"].to_numpy(), atol=1e-6)
    ea, eb = rec.select_examples(FEATURES, ecfg), st.select_examples(FEATURES, scfg)
    ta, tb = ea[ea.kind == "top"].reset_index(drop=True), eb[eb.kind == "top"].reset_index(drop=True)
    cols = ["layer", "feature", "rank", "ctx", "pos"]
    assert (ta[cols].to_numpy() == tb[cols].to_numpy()).all() and len(ta) == len(tb)
    assert np.allclose(ta["act"].to_numpy(), tb["act"].to_numpy(), atol=1e-6)
    for pa, pb, xa, xb in zip(ta.nz_pos, tb.nz_pos, ta.nz_act, tb.nz_act):
        assert list(pa) == list(pb) and np.allclose(xa, xb, atol=1e-6)
    # quantile examples: active contexts outside the top, at most bins x per-bin per feature
    q = eb[eb.kind == "quantile"]
    assert (q.groupby(["layer", "feature"]).size() <= 4).all()
    dense = {f: rec.dense_acts(*f) for f in FEATURES}
    for l, f, c, act in zip(q.layer, q.feature, q.ctx, q.act):
        assert dense[(l, f)][c] == pytest.approx(act, abs=1e-6) and act != 0
    assert not set(zip(q.layer, q.feature, q.ctx)) & set(zip(tb.layer, tb.feature, tb.ctx))
    (l, f), c = FEATURES[0], int(tb.ctx[0])
    assert np.allclose(st.token_acts(l, f, [c])[0], rec.token_acts(l, f, [c])[0], atol=1e-6)
    # 60 contexts <= the context sample: the stream store holds every context's activation, exactly
    for key in FEATURES:
        assert np.allclose(st.dense_acts(*key), dense[key], atol=1e-6)
        nat = st.natural_acts(*key)
        assert nat.exact and np.allclose(nat.acts[np.argsort(nat.pos)], dense[key], atol=1e-6)
        act_st, exact = st.active_acts(*key)
        assert exact and np.allclose(np.sort(act_st), np.sort(rec.active_acts(*key)[0]), atol=1e-6)
    # disk: the state, not one part per batch
    assert not list((tmp_path / "st").glob("rounds/*/part-*.parquet"))
    assert len(list((tmp_path / "st").glob("rounds/*/stream.npz"))) == 1
    # a sample smaller than the corpus: dense_acts is refused with the fix named, natural_acts estimates
    small, _ = _build(interp_world, tmp_path / "small", "stream", context_sample=16, eval_reservoir=6)
    with pytest.raises(DataFormatError, match="--context-sample"):
        small.dense_acts(*FEATURES[0])
    for key in FEATURES:
        nat, d = small.natural_acts(*key), dense[key]
        assert len(nat.uniform_pos) == 16 and np.allclose(nat.uniform_acts, d[nat.uniform_pos], atol=1e-6)
        assert np.allclose(nat.acts, d[nat.pos], atol=1e-6)  # every held activation is the context's own
        n_act = int((d != 0).sum())
        assert nat.n_active == n_act
        silent = nat.acts == 0
        if silent.any():
            assert nat.weight[silent].sum() == pytest.approx(len(d) - n_act)  # the silent share is exact
        top = np.argsort(-np.abs(d), kind="stable")[: nat.n_top_exact]
        assert set(nat.pos[: nat.n_top_exact]) == set(top) and (nat.weight[: nat.n_top_exact] == 1).all()
        if (~silent[nat.n_top_exact :]).any():
            assert nat.weight[~silent].sum() == pytest.approx(n_act)
        else:
            assert n_act <= nat.n_top_exact or nat.exact


def test_stream_resume_and_store_kind_is_checked(interp_world, tmp_path):
    root = tmp_path / "st"
    st, scfg = _build(interp_world, root, "stream", checkpoint_every=1, context_sample=16, eval_reservoir=6)
    full = st.select_examples(FEATURES, scfg)
    nat_full = {k: st.natural_acts(*k) for k in FEATURES}
    # pretend a kill after batch 1: rewind the saved state to a fresh one at batch 1, rerun, same result
    path = next(root.glob("rounds/*/stream.npz"))
    state = StreamingExamples.load(path)
    assert state.next_batch == 4  # 60 contexts / 16
    _, _, lm, clt = interp_world
    partial = StreamingExamples(
        state.keys,
        state.n_top,
        state.reservoir,
        state.ctx_len,
        state.seed,
        state.eval_top,
        state.eval_reservoir,
        state.sample_ctx,
    )
    tokens = st.contexts["token_ids"].tolist()
    ids = torch.as_tensor(st.contexts["ctx_id"].to_numpy().copy())
    for layer, fl, acts in batch_activations(
        lm, clt, tokens[:16], features_by_layer(state.keys), pad_id_of(lm.tokenizer)
    ):
        partial.update(layer, fl, acts, ids[:16])
    partial.next_batch = 1
    partial.save(path)
    again, _ = _build(interp_world, root, "stream", checkpoint_every=1, context_sample=16, eval_reservoir=6)
    assert (
        again.select_examples(FEATURES, scfg)
        .drop(columns=["nz_pos", "nz_act"])
        .equals(full.drop(columns=["nz_pos", "nz_act"]))
    )
    for k in FEATURES:
        n = again.natural_acts(*k)
        assert np.array_equal(n.pos, nat_full[k].pos) and np.array_equal(n.weight, nat_full[k].weight)
        assert np.allclose(n.acts, nat_full[k].acts, atol=1e-6)
    with pytest.raises(ConfigMismatchError, match="--examples-store stream"):
        _build(interp_world, root, "records")


def test_same_state_whatever_the_batch_size(interp_world, tmp_path):
    kw = {"context_sample": 16, "eval_reservoir": 6}
    a, _ = _build(interp_world, tmp_path / "a", "stream", batch_size=7, **kw)
    b, _ = _build(interp_world, tmp_path / "b", "stream", batch_size=32, **kw)
    for k in FEATURES:
        na, nb = a.natural_acts(*k), b.natural_acts(*k)
        assert np.array_equal(na.pos, nb.pos) and np.array_equal(na.weight, nb.weight)
        assert np.allclose(na.acts, nb.acts, atol=1e-5) and np.array_equal(na.uniform_pos, nb.uniform_pos)


def test_state_on_disk_does_not_grow_with_the_corpus(interp_world, tmp_path):
    kw = {"context_sample": 16, "eval_reservoir": 6}
    sizes, nbytes, shapes = [], [], []
    for n_docs in (60, 240):
        st, _ = _build(interp_world, tmp_path / f"d{n_docs}", "stream", n_docs=n_docs, **kw)
        assert st.n_contexts >= n_docs
        files = [p for p in (tmp_path / f"d{n_docs}" / "rounds").rglob("*") if p.is_file()]
        sizes.append(sum(p.stat().st_size for p in files))
        state = StreamingExamples.load(next((tmp_path / f"d{n_docs}").glob("rounds/*/stream.npz")))
        assert state.ctx_len <= 64  # token activations are kept for at most the context length
        nbytes.append(state.nbytes)
        shapes.append(
            {(n, k): tuple(v.shape[:2]) for n in ("top", "res", "etop", "eres") for k, v in getattr(state, n).items()}
        )
        shapes[-1]["sample"] = tuple(state.sample_act.shape)
    assert shapes[0] == shapes[1]  # the state is fixed by features x (lists + sample), not the corpus
    assert max(sizes) <= max(nbytes) + 64 * 1024  # and the files are that state (compressed), nothing per batch
    rec_sizes = []
    for n_docs in (60, 240):
        _build(interp_world, tmp_path / f"r{n_docs}", "records", n_docs=n_docs)
        rec_sizes.append(sum(p.stat().st_size for p in (tmp_path / f"r{n_docs}" / "rounds").rglob("*.parquet")))
    assert rec_sizes[1] > 2 * rec_sizes[0]  # what records mode does instead


# --------------------------------------------------------------------------- synthetic populations
def _synthetic(n=12000, densities=(0.02, 0.4), sample=3000, eval_top=64, eval_res=512, batch=997):
    """A store state over ``n`` contexts whose activations are known: ``best[c, u]``."""
    rng = np.random.default_rng(0)
    best = np.zeros((n, len(densities)), dtype=np.float32)
    for u, d in enumerate(densities):
        on = rng.choice(n, int(d * n), replace=False)
        best[on, u] = rng.gamma(2.0, 1.0, len(on)).astype(np.float32) + 0.01
    acts = torch.zeros(n, 4, len(densities))
    acts[:, 2] = torch.from_numpy(best)
    keys = [(0, 10 + u) for u in range(len(densities))]
    st = StreamingExamples(keys, 5, 8, 4, 1, eval_top, eval_res, context_sample(np.arange(n), sample, 1))
    feats = torch.tensor([f for _, f in keys])
    for lo in range(0, n, batch):
        st.update(0, feats, acts[lo : lo + batch], torch.arange(lo, min(n, lo + batch)))
    nats = []
    for u, key in enumerate(keys):
        d = st.natural(*key, n)
        nats.append(
            NaturalActs(
                d["ctx"],
                d["acts"],
                d["weight"],
                d["uniform_ctx"],
                d["uniform_acts"],
                n,
                int(st.n_active[u]),
                d["n_top_exact"],
            )
        )
    return best.astype(np.float64), nats


def test_held_contexts_represent_the_population():
    best, nats = _synthetic()
    for u, nat in enumerate(nats):
        true = best[:, u]
        assert np.array_equal(nat.acts, true[nat.pos])  # held values are exact
        assert np.array_equal(nat.uniform_acts, true[nat.uniform_pos]) and len(set(nat.uniform_pos)) == 3000
        assert nat.weight.sum() == pytest.approx(len(true))  # stands for the whole corpus
        assert nat.weight[nat.acts == 0].sum() == pytest.approx((true == 0).sum())  # silent share exact
        top = np.argsort(-true, kind="stable")[:64]
        assert set(nat.pos[:64]) == set(top)
        # the weighted distribution of held activations matches the corpus' (quartiles of the active ones)
        for q in np.quantile(true[true > 0], [0.25, 0.5, 0.75]):
            est = nat.weight[nat.acts <= q].sum() / len(true)
            assert est == pytest.approx((true <= q).mean(), abs=0.03)


def test_weighted_fade_sample_draws_from_the_right_populations():
    best, nats = _synthetic()
    for u, nat in enumerate(nats):
        true = best[:, u]
        exact = fade_sample(true, 500, 0.1, rng=np.random.default_rng(3))
        held = fade_sample_weighted(nat.acts, nat.weight, 500, 0.1, rng=np.random.default_rng(3))
        got = nat.pos[held]
        assert len(np.unique(got)) == len(got) and np.isin(got, nat.pos).all()
        # silent contexts come only from the uniform context sample, and in the exact sampler's share
        silent = got[true[got] == 0]
        assert np.isin(silent, nat.uniform_pos).all()
        assert abs(len(silent) - int((true[exact] == 0).sum())) <= 30, (u, len(silent), (true[exact] == 0).sum())
        # the strongest contexts (the 10% from the top) are all drawn, as by the exact sampler
        assert set(np.argsort(-true, kind="stable")[:40]) <= set(got)
        # the active contexts drawn spread over the active ones' quartiles like the exact sampler's
        act_got, act_ex = true[got][true[got] > 0], true[exact][true[exact] > 0]
        qs = np.quantile(true[true > 0], [0.25, 0.5, 0.75])
        h_got = np.bincount(np.searchsorted(qs, act_got), minlength=4) / max(len(act_got), 1)
        h_ex = np.bincount(np.searchsorted(qs, act_ex), minlength=4) / max(len(act_ex), 1)
        assert np.abs(h_got - h_ex).max() <= 0.2, (u, h_got, h_ex)
    # all weights 1: exactly fade_sample
    acts = np.random.default_rng(1).gamma(1.0, 1.0, 900)
    assert np.array_equal(
        fade_sample_weighted(acts, np.ones(900), rng=np.random.default_rng(2)),
        fade_sample(acts, rng=np.random.default_rng(2)),
    )


def test_weighted_draws_follow_the_weights():
    # one bin of 40 contexts standing for themselves and 40 standing for 50 contexts each
    acts = np.r_[np.zeros(40), np.ones(40)]
    w = np.r_[np.ones(40), np.full(40, 50.0)]
    heavy = []
    for seed in range(30):
        idx = fade_sample_weighted(
            acts, w, n_samples=10, top_fraction=0.0, percentiles=(0, 100), rng=np.random.default_rng(seed)
        )
        assert len(idx) == 10
        heavy.append(float((idx >= 40).mean()))
    assert np.mean(heavy) > 0.9  # 2,000 of the 2,040 contexts are behind the heavy ones


def test_pie_sample_on_held_contexts():
    best, nats = _synthetic()
    for u, nat in enumerate(nats):
        true = best[:, u]
        top, rand = pie_sample_held(
            nat.acts, nat.pos, nat.n_top_exact, nat.uniform_pos, 10, 10, np.random.default_rng(0)
        )
        assert set(nat.pos[top]) == set(pie_sample(true, 10, 0)[:10])  # the exact top 10
        assert len(rand) == 10 and not np.isin(nat.uniform_pos[rand], nat.pos[top]).any()
    # the random draws are uniform over the other contexts: their active share is the density
    share = []
    for seed in range(200):
        _, rand = pie_sample_held(
            nats[1].acts, nats[1].pos, nats[1].n_top_exact, nats[1].uniform_pos, 10, 10, np.random.default_rng(seed)
        )
        share.append((nats[1].uniform_acts[rand] > 0).mean())
    assert np.mean(share) == pytest.approx((best[:, 1] > 0).mean(), abs=0.05)


def test_reservoir_does_not_depend_on_batching():
    g = torch.Generator().manual_seed(0)
    acts = torch.relu(torch.randn(40, 6, 3, generator=g) - 0.8)  # [B, T, U]
    ctx = torch.arange(40)
    feats = torch.tensor([2, 9, 11])
    sample = context_sample(np.arange(40), 10, 3)
    keys = [(0, 2), (0, 9), (0, 11)]
    one = StreamingExamples(
        keys, n_top=4, reservoir=5, ctx_len=6, seed=3, eval_top=6, eval_reservoir=7, sample_ctx=sample
    )
    one.update(0, feats, acts, ctx)
    many = StreamingExamples(
        keys, n_top=4, reservoir=5, ctx_len=6, seed=3, eval_top=6, eval_reservoir=7, sample_ctx=sample
    )
    for lo, hi in ((0, 7), (7, 19), (19, 33), (33, 40)):
        many.update(0, feats, acts[lo:hi], ctx[lo:hi])
    for st in (one, many):
        st.flush(), st.canonical()
    for name in ("top", "res", "etop", "eres"):
        for k, v in getattr(one, name).items():
            assert torch.equal(v, getattr(many, name)[k]), (name, k)
    assert torch.equal(one.sample_act, many.sample_act)
    # the top list is the exact top-4 by |act| (ties by context id), the head of the longer one
    best = acts.abs().amax(1)  # [B, U]
    for u in range(3):
        order = sorted(range(40), key=lambda c: (-float(best[c, u]), c))[:4]
        assert one.top["ctx"][u].tolist() == [c if best[c, u] > 0 else -1 for c in order]
        assert torch.equal(one.etop["ctx"][u, :4], one.top["ctx"][u]) and torch.equal(
            one.eres["ctx"][u, :5], one.res["ctx"][u]
        )
        assert torch.allclose(one.sample_act[u], acts[sample].amax(1)[:, u])
    assert (one.n_active == (best > 0).sum(0)).all()
    assert len(set(context_sample(np.arange(1000), 100, 0))) == 100


def test_old_stream_state_without_evaluation_part_is_refused(tmp_path):
    # a streaming store written before the context sample existed: one line naming the fix
    root = tmp_path / "old"
    (root / "rounds" / "r").mkdir(parents=True)
    pd.DataFrame(
        {
            "ctx_id": [0, 1],
            "doc_id": [0, 1],
            "token_ids": [[1, 2], [1, 3]],
            "text": ["a", "b"],
            "starts": [[0], [0]],
            "ends": [[1], [1]],
        }
    ).to_parquet(root / "contexts.parquet")
    (root / "manifest.json").write_text('{"version": 1, "store": "stream", "n_contexts": 2}')
    (root / "rounds" / "r" / "features.json").write_text('{"features": [[0, 1]], "batch_size": 2}')
    StreamingExamples([(0, 1)], 2, 2, 2).save(root / "rounds" / "r" / "stream.npz")
    with pytest.raises(DataFormatError, match="fresh --out"):
        ActivationStore(root).natural_acts(0, 1)


# --------------------------------------------------------------------------- pie evaluate on it
def test_evaluate_on_stream_stores_end_to_end(interp_world, tmp_path):
    m, c, _, _ = interp_world
    from pie_lib.evaluate.protocol import evaluate
    from pie_lib.interpret.pipeline import InterpretConfig, interpret

    base = {"batch_size": 16, "n_top": 10, "n_quantile_bins": 0}  # top examples only: same descriptions
    configs = {
        "records": ExampleConfig(store="records", **base),
        "stream": ExampleConfig(**base),  # default sizes: 120 documents are held whole
        "small": ExampleConfig(context_sample=40, eval_top=16, eval_reservoir=12, **base),
    }
    res = {}
    for name, ex in configs.items():
        cfg = InterpretConfig(corpus=CorpusConfig(n_docs=120), examples=ex)
        interpret(features=FEATURES, model=str(m), clt=str(c), out=tmp_path / name, config=cfg, progress=False)
        for protocol in ("pie", "fade"):
            res[name, protocol] = evaluate(tmp_path / name / "descriptions.parquet", protocol=protocol, progress=False)
    n_contexts = ActivationStore(tmp_path / "small" / "examples").n_contexts
    assert n_contexts > 40
    cols = ["layer", "feature", "description", "clarity", "responsiveness", "purity", "n_natural", "n_rated_2"]
    for protocol in ("pie", "fade"):
        a, b, s = res["records", protocol], res["stream", protocol], res["small", protocol]
        assert (a.natural_sampling == "exact").all() and (b.natural_sampling == "exact").all()
        pd.testing.assert_frame_equal(a[cols], b[cols])  # every context held: the same draws and numbers
        assert (s.natural_sampling == "estimated").all() and (s.status == "ok").all()
        assert s["clarity"].notna().all() and (s.clarity_status == "computed").all()
        if protocol == "pie":
            assert (s.n_natural == 20).all()  # 10 exact top + 10 from the uniform sample
    # what the estimated evaluation rated: the exact top contexts plus uniform-sample contexts
    small = ActivationStore(tmp_path / "small" / "examples")
    dense = ActivationStore(tmp_path / "records" / "examples")
    for key in FEATURES:
        nat = small.natural_acts(*key)
        assert np.allclose(nat.acts, dense.dense_acts(*key)[nat.pos], atol=1e-6)


def test_cli_stream_flags_need_the_stream_store(tmp_path):
    import argparse

    from pie_lib.cli.interpret import add_interpret_parser
    from pie_lib.errors import PieError

    parser = argparse.ArgumentParser(prog="pie")
    add_interpret_parser(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(["interpret", "--features", "0:1", "--examples-store", "records", "--context-sample", "9"])
    with pytest.raises(PieError, match="--context-sample: only for --examples-store stream"):
        args.func(args)
    assert parser.parse_args(["interpret", "--features", "0:1"]).examples_store == "stream"
