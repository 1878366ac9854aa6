"""Streaming example store: running top-N and reservoir per feature, against records mode."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pie_lib.errors import ConfigMismatchError, DataFormatError
from pie_lib.interpret.corpus import CorpusConfig
from pie_lib.interpret.examples import ActivationStore, ExampleConfig, StreamingExamples

FEATURES = [(0, 1), (0, 5), (1, 3), (2, 7), (2, 40)]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _build(world, root, store, **kw):
    _, _, lm, clt = world
    ecfg = ExampleConfig(batch_size=16, n_top=5, n_quantile_bins=2, n_per_quantile=2, store=store, **kw)
    return ActivationStore.build(
        lm, clt, FEATURES, root, CorpusConfig(n_docs=60), ecfg, {"m": "tiny"}, progress=False
    ), ecfg


def test_stream_matches_records_on_top_examples_and_stats(interp_world, tmp_path):
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
    # token activations come back for the held contexts; dense_acts is refused with the fix named
    (l, f), c = FEATURES[0], int(tb.ctx[0])
    assert np.allclose(st.token_acts(l, f, [c])[0], rec.token_acts(l, f, [c])[0], atol=1e-6)
    with pytest.raises(DataFormatError, match="--examples-store records"):
        st.dense_acts(l, f)
    # disk: the state, not one part per batch
    assert not list((tmp_path / "st").glob("rounds/*/part-*.parquet"))
    assert len(list((tmp_path / "st").glob("rounds/*/stream.npz"))) == 1


def test_stream_resume_and_store_kind_is_checked(interp_world, tmp_path):
    root = tmp_path / "st"
    st, scfg = _build(interp_world, root, "stream", checkpoint_every=1)
    full = st.select_examples(FEATURES, scfg)
    # pretend a kill after batch 1: rewind the saved state to a fresh one at batch 1, rerun, same result
    path = next(root.glob("rounds/*/stream.npz"))
    state = StreamingExamples.load(path)
    assert state.next_batch == 4  # 60 contexts / 16
    _, _, lm, clt = interp_world
    partial = StreamingExamples(state.keys, state.n_top, state.reservoir, state.ctx_len, state.seed)
    from pie_lib.interpret.examples import batch_activations, features_by_layer, pad_id_of

    tokens = st.contexts["token_ids"].tolist()
    ids = torch.as_tensor(st.contexts["ctx_id"].to_numpy())
    for layer, fl, acts in batch_activations(
        lm, clt, tokens[:16], features_by_layer(state.keys), pad_id_of(lm.tokenizer)
    ):
        partial.update(layer, fl, acts, ids[:16])
    partial.next_batch = 1
    partial.save(path)
    again, _ = _build(interp_world, root, "stream", checkpoint_every=1)
    assert (
        again.select_examples(FEATURES, scfg)
        .drop(columns=["nz_pos", "nz_act"])
        .equals(full.drop(columns=["nz_pos", "nz_act"]))
    )
    with pytest.raises(ConfigMismatchError):
        _build(interp_world, root, "records")


def test_reservoir_does_not_depend_on_batching():
    g = torch.Generator().manual_seed(0)
    acts = torch.relu(torch.randn(40, 6, 3, generator=g) - 0.8)  # [B, T, U]
    ctx = torch.arange(40)
    feats = torch.tensor([2, 9, 11])
    one = StreamingExamples([(0, 2), (0, 9), (0, 11)], n_top=4, reservoir=5, ctx_len=6, seed=3)
    one.update(0, feats, acts, ctx)
    many = StreamingExamples([(0, 2), (0, 9), (0, 11)], n_top=4, reservoir=5, ctx_len=6, seed=3)
    for lo in (0, 7, 19, 33):
        hi = {0: 7, 7: 19, 19: 33, 33: 40}[lo]
        many.update(0, feats, acts[lo:hi], ctx[lo:hi])
    for k in StreamingExamples.FIELDS:
        assert torch.equal(one.top[k], many.top[k]) and torch.equal(one.res[k], many.res[k])
    # the top list is the exact top-4 by |act| (ties by context id)
    best = acts.abs().amax(1)  # [B, U]
    for u in range(3):
        order = sorted(range(40), key=lambda c: (-float(best[c, u]), c))[:4]
        assert one.top["ctx"][u].tolist() == [c if best[c, u] > 0 else -1 for c in order]
    assert (one.n_active == (best > 0).sum(0)).all()
