"""Stage II on a tiny random world: examples, explainers, resumability, CLI, costs, secrets."""

from __future__ import annotations

import argparse
import json
import logging

import numpy as np
import pandas as pd
import pytest
import torch
from fake_llm_server import FakeLLMServer

from pie_lib.errors import DataFormatError, MissingDependencyError, PieError
from pie_lib.interpret import prompts as P
from pie_lib.interpret.corpus import CorpusConfig, iter_documents, make_contexts
from pie_lib.interpret.costs import effective_budget_cost_saving
from pie_lib.interpret.examples import ActivationStore, ExampleConfig, encode_features
from pie_lib.interpret.explainers import ExplainConfig
from pie_lib.interpret.pipeline import InterpretConfig, features_from_selections, interpret
from pie_lib.llm import LLMConfig, RetryPolicy

SECRET = "sk-test-SECRET"
FEATURES = [(0, 1), (0, 5), (1, 3), (2, 7), (2, 40)]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def world(interp_world):
    return interp_world


def _cfg(n_docs: int = 120) -> InterpretConfig:
    return InterpretConfig(corpus=CorpusConfig(n_docs=n_docs), examples=ExampleConfig(batch_size=16, n_top=10))


def _selections() -> list[dict]:
    return [
        {
            "method": "fap-synergy",
            "k": 50,
            "seed": 0,
            "prompt_idx": 0,
            "n_active": 30,
            "occurrences": [[0, 3, 1], [0, 4, 1], [1, 2, 3]],
            "scores": [1.0, 0.5, 0.2],
        },
        {
            "method": "fap-synergy",
            "k": 50,
            "seed": 0,
            "prompt_idx": 1,
            "n_active": 30,
            "occurrences": [[0, 1, 5], [1, 2, 3]],
            "scores": [1.0, 0.5],
        },
        {
            "method": "fap",
            "k": 75,
            "seed": 0,
            "prompt_idx": 0,
            "n_active": 30,
            "occurrences": [[0, 3, 1], [1, 2, 3], [2, 5, 7]],
            "scores": [1.0, 0.5, 0.2],
        },
        {
            "method": "fap",
            "k": 75,
            "seed": 0,
            "prompt_idx": 1,
            "n_active": 30,
            "occurrences": [[0, 1, 5], [2, 2, 40], [2, 3, 7]],
            "scores": [1.0, 0.5, 0.1],
        },
    ]


# --------------------------------------------------------------------------- pure pieces
def test_render_highlighted_merges_runs_and_keeps_text():
    text = "gave a drink to Mary\nnow"
    starts, ends = [0, 0, 5, 7, 13, 16, 21], [0, 4, 6, 12, 15, 20, 24]
    mask = [False, False, False, True, True, False, True]
    assert P.render_highlighted(text, starts, ends, mask) == "gave a <<drink to>> Mary\\n<<now>>"
    acts = np.array([0.0, 1.0, 0.59, 0.61, -2.0])
    assert P.highlight_mask(acts, 1.0).tolist() == [False, True, False, True, True]


def test_prompt_parsers():
    assert P.parse_explanation("thinking...\n[EXPLANATION]: names after 'to'") == "names after 'to'"
    assert P.parse_explanation('[EXPLANATION]: "quoted"') == "quoted"
    assert P.parse_explanation("no marker") is None and P.parse_explanation("[EXPLANATION]:   ") is None
    assert P.parse_generated('Sure: ["a", "b"]') == ["a", "b"] and P.parse_generated("nope") is None
    assert P.parse_ratings('{"1": 2, "2": 0, "9": 1, "3": 7}', [1, 2, 3]) == {1: 2, 2: 0}
    assert P.parse_ratings("none", [1]) is None
    msgs = P.explainer_messages([f"ex {i}" for i in range(60)])
    assert "Example 40:" in msgs[1]["content"] and "Example 41:" not in msgs[1]["content"]


def test_selection_union_and_filters(tmp_path):
    path = tmp_path / "selections.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in _selections()))
    f = features_from_selections(path, method="fap-synergy", k=50)
    assert list(zip(f.layer, f.feature, f.n_circuits)) == [(0, 1, 1), (0, 5, 1), (1, 3, 2)]
    assert len(features_from_selections(path)) == 5
    with pytest.raises(DataFormatError, match="no selections match"):
        features_from_selections(path, k=999)
    path.write_text('{"occurrences": [[1, 2]]}\n')
    with pytest.raises(DataFormatError, match="layer, position, feature"):
        features_from_selections(path)


def test_corpus_files_and_missing_datasets(tmp_path, monkeypatch):
    (tmp_path / "c.txt").write_text("first doc\n\nsecond doc\nthird\n")
    assert list(iter_documents(CorpusConfig(source=str(tmp_path / "c.txt"), n_docs=2))) == ["first doc", "second doc"]
    (tmp_path / "c.jsonl").write_text('{"text": "a b"}\n{"text": "c"}\n')
    assert list(iter_documents(CorpusConfig(source=str(tmp_path / "c.jsonl")))) == ["a b", "c"]
    (tmp_path / "bad.jsonl").write_text('{"body": "a"}\n')
    with pytest.raises(DataFormatError, match="'text'"):
        list(iter_documents(CorpusConfig(source=str(tmp_path / "bad.jsonl"))))
    import builtins

    real_import = builtins.__import__

    def no_datasets(name, *a, **k):
        if name == "datasets":
            raise ImportError("no datasets")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(MissingDependencyError, match="pip install datasets"):
        list(iter_documents(CorpusConfig(source="NeelNanda/pile-10k")))


def test_contexts_keep_spans_and_bos(world):
    _, _, lm, _ = world
    ctxs = make_contexts(
        lm.tokenizer, ["When Mary went to the store , John gave a drink to Mary ."], CorpusConfig(ctx_len=6)
    )
    c = ctxs[0]
    assert len(c.token_ids) == 6 and c.token_ids[0] == lm.tokenizer.bos_token_id
    assert [c.text[s:e] for s, e in zip(c.starts[1:], c.ends[1:])] == ["When", "Mary", "went", "to", "the"]


def test_encode_features_matches_full_encode(world):
    _, _, lm, clt = world
    x = torch.randn(2, 5, clt.d_model) * 0.05
    feats = torch.tensor([40, 1, 7])
    import copy

    relu = copy.copy(clt)
    relu.threshold = None
    topk = copy.copy(relu)
    topk.config = copy.copy(clt.config)
    topk.config.activation, topk.config.k = "topk", 3
    for c in (clt, relu, topk):  # JumpReLU, ReLU, TopK (which needs every pre-activation)
        for layer in range(clt.n_layers):
            full = c.encode(x, layer=layer)[..., feats]
            assert torch.allclose(encode_features(c, x, layer, feats), full)


# --------------------------------------------------------------------------- the store
def test_store_top_examples_nonzero_and_resumable(world, tmp_path):
    _, _, lm, clt = world
    root = tmp_path / "ex"
    corpus = CorpusConfig(n_docs=60)
    ecfg = ExampleConfig(batch_size=16, n_top=5, n_quantile_bins=2, n_per_quantile=2, store="records")
    store = ActivationStore.build(lm, clt, FEATURES[:3], root, corpus, ecfg, {"m": "tiny"}, progress=False)
    rec = store.records()
    assert len(rec) and (rec["act"] != 0).all() and (rec["pos"] > 0).all()
    # brute force: activation of every context for feature (0, 1), one context at a time
    from pie_lib.engine.traces import run_with_cache

    dense = store.dense_acts(0, 1)
    for i in np.argsort(-np.abs(dense))[:3]:
        ids = torch.tensor([store.contexts["token_ids"].iloc[i].tolist()])
        a = encode_features(clt, run_with_cache(lm, ids).resid_mid[0], 0, torch.tensor([1]))[0, 1:, 0]
        assert float(a[a.abs().argmax()]) == pytest.approx(dense[i], rel=1e-4, abs=1e-5)
    ex = store.select_examples(FEATURES[:3], ecfg)
    top = ex[(ex.layer == 0) & (ex.feature == 1) & (ex.kind == "top")]
    assert np.allclose(top["act"].to_numpy(), dense[np.argsort(-np.abs(dense))[:5]], atol=1e-6)
    assert (ex[ex.kind == "quantile"].groupby(["layer", "feature"]).size() <= 4).all()
    assert all(len(p) == len(a) and all(v != 0 for v in a) for p, a in zip(ex.nz_pos, ex.nz_act))

    parts = sorted(root.glob("rounds/*/part-*.parquet"))
    mtimes = [p.stat().st_mtime_ns for p in parts]
    store2 = ActivationStore.build(lm, clt, FEATURES[:3], root, corpus, ecfg, {"m": "tiny"}, progress=False)
    assert [p.stat().st_mtime_ns for p in parts] == mtimes  # nothing recomputed
    store2 = ActivationStore.build(lm, clt, FEATURES, root, corpus, ecfg, {"m": "tiny"}, progress=False)
    rounds = [sorted(map(tuple, json.loads(p.read_text())["features"])) for p in root.glob("rounds/*/features.json")]
    assert sorted(rounds) == sorted([sorted(FEATURES[:3]), sorted(FEATURES[3:])])  # the new round: new features only
    assert store2.covered_features() == set(FEATURES)
    assert [p.stat().st_mtime_ns for p in parts] == mtimes  # old round untouched
    from pie_lib.errors import ConfigMismatchError

    with pytest.raises(ConfigMismatchError):
        ActivationStore.build(lm, clt, FEATURES, root, CorpusConfig(n_docs=61), ecfg, {"m": "tiny"}, progress=False)


# --------------------------------------------------------------------------- end to end
def test_offline_end_to_end_interpret_and_evaluate(world, tmp_path):
    m, c, _, _ = world
    from pie_lib.evaluate.protocol import evaluate

    sel = tmp_path / "selections.jsonl"
    sel.write_text("\n".join(json.dumps(r) for r in _selections()))
    d = interpret(sel, model=str(m), clt=str(c), out=tmp_path / "run", config=_cfg(), progress=False)
    assert set(zip(d.layer, d.feature)) == set(FEATURES)
    assert (d.status == "ok").all() and d.description.str.len().gt(0).all()
    assert (d.backend == "offline").all() and (d.calls == 1).all() and (d.prompt_tokens > 0).all()
    for protocol in ("pie", "fade"):
        r = evaluate(tmp_path / "run" / "descriptions.parquet", protocol=protocol, progress=False)
        assert set(zip(r.layer, r.feature)) == set(FEATURES) and (r.protocol == protocol).all()
        for col in ("clarity", "responsiveness", "purity"):
            assert r[col].notna().all(), (protocol, col, r)
        assert (r.clarity_status == "computed").all() and (r.responsiveness_status == "computed").all()
        assert (r.n_sparse_resampled >= 0).all() and (r.n_natural >= r.n_sparse_resampled).all()
        computed = r.faithfulness_status == "computed"
        assert r.loc[computed, "faithfulness"].notna().all()
        assert r.loc[~computed, "faithfulness"].isna().all()
        assert r.loc[~computed, "faithfulness_status"].str.startswith(("skipped", "not computed")).all()
        if protocol == "pie":
            assert computed.all() and (r.n_rated == 20).all()  # no gate under pie
    assert (tmp_path / "run" / "fade_pie.parquet").exists() and (tmp_path / "run" / "fade_fade.parquet").exists()


def test_misbehaving_server_run_finishes_and_resumes(world, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    m, c, _, _ = world
    monkeypatch.setenv("PIE_LLM_API_KEY", SECRET)
    out = tmp_path / "run"
    cfg = _cfg()
    cfg.explain = ExplainConfig(parse_retries=1)
    with FakeLLMServer(["ok", "malformed", "malformed", "ok", "500"]) as srv:
        llm = LLMConfig(
            backend="openai",
            model="fake",
            base_url=srv.base_url,
            workers=1,
            retry=RetryPolicy(max_retries=1, base_delay_s=0.01, max_delay_s=0.02),
        )
        d = interpret(features=FEATURES, model=str(m), clt=str(c), llm=llm, out=out, config=cfg, progress=False)
        # feature 1 ok; feature 2 two malformed answers -> parse_failed; feature 3 ok; the rest: 500s
        assert d.status.tolist() == ["ok", "parse_failed", "ok", "request_failed", "request_failed"]
        assert d.parse_failures.tolist()[:3] == [0, 2, 0]
        assert d.loc[3:, "error"].str.contains("500").all()
        n_first = srv.n_requests
        assert n_first == 1 + 2 + 1 + 2 * 2
        srv.set(["ok"])
        d2 = interpret(features=FEATURES, model=str(m), clt=str(c), llm=llm, out=out, config=cfg, progress=False)
        assert srv.n_requests == n_first + 2  # only the two failed features were asked again
        assert d2.status.tolist() == ["ok", "parse_failed", "ok", "ok", "ok"]
        assert d2.loc[:2, "description"].equals(d.loc[:2, "description"])  # finished work kept
        from pie_lib.evaluate.protocol import evaluate

        r = evaluate(out / "descriptions.parquet", protocol="pie", llm=llm, progress=False)
        assert (r.backend == "openai").all() and r.loc[r.status == "ok", "calls"].gt(0).all()
        assert (r.loc[1, "status"] == "no_description") and np.isnan(r.loc[1, "clarity"])
    # the key appears nowhere: logs, cache, result files (parquet bytes included)
    assert SECRET not in caplog.text
    for f in out.rglob("*"):
        if f.is_file():
            assert SECRET.encode() not in f.read_bytes(), f


def test_hf_backend_explainer_counts_real_tokens(world, tmp_path):
    m, c, _, _ = world
    cfg = _cfg(n_docs=40)
    cfg.explain = ExplainConfig(max_tokens=8, parse_retries=0)
    llm = LLMConfig(backend="hf", model=str(m), device="cpu")
    d = interpret(
        features=FEATURES[:2], model=str(m), clt=str(c), llm=llm, out=tmp_path / "hf", config=cfg, progress=False
    )
    # a random model cannot write "[EXPLANATION]:": each answer is counted, never scored
    assert (d.status == "parse_failed").all() and (d.parse_failures == 1).all()
    assert (d.completion_tokens == 8).all() and (d.prompt_tokens > 100).all() and (d.backend == "hf").all()
    assert (tmp_path / "hf" / "llm_cache").exists()


def test_cli_parsers_run_offline(world, tmp_path):
    m, c, _, _ = world
    from pie_lib.cli.evaluate import add_evaluate_parser
    from pie_lib.cli.interpret import add_interpret_parser

    parser = argparse.ArgumentParser(prog="pie")
    sub = parser.add_subparsers(dest="cmd")
    add_interpret_parser(sub)
    add_evaluate_parser(sub)
    out = tmp_path / "cli"
    args = parser.parse_args(
        [
            "interpret",
            "--features",
            "0:1,1:3",
            "--model",
            str(m),
            "--clt",
            str(c),
            "--n-docs",
            "40",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert args.func(args) == 0 and (out / "descriptions.parquet").exists()
    args = parser.parse_args(
        ["evaluate", "--descriptions", str(out / "descriptions.parquet"), "--protocol", "pie", "--no-progress"]
    )
    assert args.func(args) == 0 and len(pd.read_parquet(out / "fade_pie.parquet")) == 2
    from pie_lib.cli import main

    # errors travel to the `pie` entry point, which prints one line and exits 2
    with pytest.raises(PieError, match="missing.jsonl"):
        args = parser.parse_args(["interpret", "--selections", str(tmp_path / "missing.jsonl"), "--out", str(out)])
        args.func(args)
    assert main(["interpret", "--selections", str(tmp_path / "missing.jsonl"), "--out", str(out)]) == 2


def test_effective_budget_cost_saving_from_measured_counts():
    desc = pd.DataFrame(
        {
            "layer": [0, 0, 1, 2, 2],
            "feature": [1, 5, 3, 7, 40],
            "calls": [1, 1, 2, 1, 1],
            "prompt_tokens": [100, 200, 300, 100, 100],
            "completion_tokens": [10, 10, 20, 10, 10],
        }
    )
    res = effective_budget_cost_saving(desc, _selections(), 50, 75, "fap-synergy", "fap")
    t = res.table.set_index("k")
    # K=50 circuits: {(0,1),(1,3)} and {(0,5),(1,3)} -> tokens (110+320) and (210+320)
    assert t.loc[50, "features_per_circuit"] == 2 and t.loc[50, "total_tokens_per_circuit"] == pytest.approx(480)
    # K=75 circuits: {(0,1),(1,3),(2,7)} = 540, {(0,5),(2,40),(2,7)} = 430
    assert t.loc[75, "total_tokens_per_circuit"] == pytest.approx(485)
    assert res.saving["total_tokens_per_circuit"] == pytest.approx(1 - 480 / 485)
    # union: K=50 explains {(0,1),(0,5),(1,3)} = 640 tokens; K=75 all five = 860
    assert res.saving["total_tokens_union"] == pytest.approx(1 - 640 / 860)
    assert res.saving["calls_union"] == pytest.approx(1 - 4 / 6) and t.loc[75, "n_imputed"] == 0
    res2 = effective_budget_cost_saving(desc.iloc[:3], _selections(), 50, 75)
    assert res2.table.set_index("k").loc[75, "n_imputed"] == 2  # unexplained features charged the mean


def _toy_built() -> bool:
    from pie_lib.toy import toy_clt_path, toy_model_path

    return (toy_model_path("llama") / "config.json").exists() and (toy_clt_path("llama") / "config.yaml").exists()


@pytest.mark.skipif(not _toy_built(), reason="toy world assets not built (python -m pie_lib.toy.build)")
def test_toy_world_defaults(tmp_path):
    """The defaults (toy world llama, toy corpus, offline backend) run end to end."""
    from pie_lib.evaluate.protocol import evaluate

    feats = [(0, 0), (0, 1), (1, 2)]
    d = interpret(features=feats, out=tmp_path / "toy", config=_cfg(n_docs=200), progress=False)
    assert len(d) == 3 and d.status.isin(["ok", "no_examples"]).all()
    r = evaluate(tmp_path / "toy" / "descriptions.parquet", progress=False)
    ok = r.status == "ok"
    assert r.loc[ok, "clarity"].notna().all()
    defined = ok & (r.n_rated_2 > 0) & (r.n_rated_0 > 0)  # FADE leaves them undefined otherwise
    assert r.loc[defined, ["responsiveness", "purity"]].notna().all().all()
