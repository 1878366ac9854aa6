"""`pie graph` end to end on a fixture world (random tiny models): graph files validate against
circuit-tracer's own pydantic models, graph-metadata.json lists them, the viewer's server serves
them on 127.0.0.1, and (where Chromium is installed) the page shows every kept occurrence."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from pie_lib.cli import main
from pie_lib.graph.export import slug_for

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def graph_run(tiny_worlds, tmp_path_factory, one_torch_thread):
    """prune + graph on the tiny Llama world (a fixture the project's code was not built on)."""
    w = tiny_worlds["llama"]
    out = tmp_path_factory.mktemp("graph_run")
    rc = main(
        [
            "prune",
            "--model",
            str(w.model_dir),
            "--clt",
            str(w.clt_dir),
            "--data",
            str(w.pairs_path),
            "--n",
            "3",
            "--methods",
            "fap,random",
            "--k",
            "6",
            "--seeds",
            "0",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 0
    rc = main(
        [
            "graph",
            "--selections",
            str(out / "selections.jsonl"),
            "--method",
            "fap",
            "--k",
            "6",
            "--all",
            "--out",
            str(out / "graphs"),
            "--edge-threshold",
            "0.0",
            "--no-progress",
        ]
    )
    assert rc == 0
    return out


def _selections(run):
    return [json.loads(x) for x in (run / "selections.jsonl").read_text().splitlines() if x.strip()]


def test_graph_files_validate_against_circuit_tracer(graph_run):
    gm = pytest.importorskip(
        "circuit_tracer.frontend.graph_models", reason="pip install --no-deps circuit-tracer==0.5.0"
    )
    sels = [s for s in _selections(graph_run) if s["method"] == "fap"]
    meta = json.loads((graph_run / "graphs" / "graph-metadata.json").read_text())
    assert sorted(g["slug"] for g in meta["graphs"]) == sorted(slug_for("fap", 6, 0, s["prompt_idx"]) for s in sels)
    for s in sels:
        slug = slug_for("fap", 6, 0, s["prompt_idx"])
        data = json.loads((graph_run / "graphs" / f"{slug}.json").read_text())
        model = gm.Model.model_validate(data)
        assert model.metadata.slug == slug and model.metadata.schema_version == 1
        feats = {n.node_id: n for n in model.nodes if n.feature_type == "cross layer transcoder"}
        assert set(feats) == {f"{l}_{f}_{t}" for l, t, f in s["occurrences"]}
        for l, t, f in s["occurrences"]:
            n = feats[f"{l}_{f}_{t}"]
            assert n.feature == (l + f) * (l + f + 1) // 2 + f and n.ctx_idx == t and n.layer == str(l)
        logits = [n for n in model.nodes if n.feature_type == "logit"]
        assert len(logits) == 2 and [n.is_target_logit for n in logits] == [True, False]
        assert all(0 <= n.token_prob <= 1 for n in logits)
        emb = [n for n in model.nodes if n.feature_type == "embedding"]
        assert len(emb) == len(model.metadata.prompt_tokens)
        ids = {n.node_id for n in model.nodes}
        assert len(ids) == len(model.nodes)
        for link in model.links:
            gm.Link.model_validate(link)
            assert link["source"] in ids and link["target"] in ids


def test_graph_bad_input_is_one_line(graph_run, capsys):
    sel = str(graph_run / "selections.jsonl")
    cases = [
        (["--method", "fap", "--k", "7", "--all"], "no selections for --method fap --k 7"),
        (["--method", "fap", "--k", "6"], "exactly one of --prompt-idx"),
        (["--method", "fap", "--k", "6", "--prompt-idx", "99"], "--prompt-idx 99"),
        (["--method", "fap", "--k", "6", "--all", "--seed", "5"], "--seed 5"),
        (["--method", "fap", "--k", "6", "--all", "--edge-threshold", "2"], "--edge-threshold 2"),
    ]
    for extra, words in cases:
        rc = main(["graph", "--selections", sel, "--out", str(graph_run / "bad"), *extra, "--no-progress"])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and words in err and "\n" not in err, (extra, err)
    rc = main(["graph", "--serve", str(graph_run)])
    assert rc == 2 and "graph-metadata.json is missing" in capsys.readouterr().err


def test_server_serves_on_loopback(graph_run):
    pytest.importorskip("circuit_tracer.frontend.local_server", reason="pip install --no-deps circuit-tracer==0.5.0")
    from pie_lib.graph.serve import start_viewer

    viewer = start_viewer(graph_run / "graphs", port=0)
    try:
        assert viewer.url.startswith("http://127.0.0.1:")
        assert viewer.httpd.server_address[0] == "127.0.0.1"
        base = viewer.url.split("/index.html")[0]
        meta = json.load(urllib.request.urlopen(f"{base}/data/graph-metadata.json", timeout=10))
        slug = meta["graphs"][0]["slug"]
        graph = json.load(urllib.request.urlopen(f"{base}/graph_data/{slug}.json", timeout=10))
        assert graph["metadata"]["slug"] == slug
        assert b"Attribution Graphs" in urllib.request.urlopen(viewer.url, timeout=10).read()
    finally:
        viewer.stop()


def test_serve_command_prints_url(graph_run):
    pytest.importorskip("circuit_tracer.frontend.local_server", reason="pip install --no-deps circuit-tracer==0.5.0")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pie_lib", "graph", "--serve", str(graph_run / "graphs"), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        line = proc.stdout.readline()
        url = line.split(" at ")[1].split()[0]
        assert url.startswith("http://127.0.0.1:") and "slug=fap-k6-s0-p" in url
        assert urllib.request.urlopen(url, timeout=10).status == 200
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_serve_without_circuit_tracer_is_a_clear_error(graph_run, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "circuit_tracer.frontend.local_server", None)
    rc = main(["graph", "--serve", str(graph_run / "graphs")])
    err = capsys.readouterr().err
    assert rc == 2 and "pip install --no-deps circuit-tracer==0.5.0" in err


def test_every_kept_occurrence_on_screen_in_chromium(graph_run, tmp_path):
    from pie_lib.graph.browser import load_graph_page, missing_requirements
    from pie_lib.graph.serve import start_viewer

    missing = missing_requirements()
    if missing:
        pytest.skip("no headless browser setup: " + "; ".join(missing) + " (make browser installs it)")
    sel = next(s for s in _selections(graph_run) if s["method"] == "fap")
    slug = slug_for("fap", 6, 0, sel["prompt_idx"])
    viewer = start_viewer(graph_run / "graphs", port=0)
    try:
        report = load_graph_page(viewer.url.replace(viewer.url.split("slug=")[1], slug), screenshot=tmp_path / "g.png")
    finally:
        viewer.stop()
    assert not [e for e in report.errors if e.startswith("page error")], report.errors
    kept = {f"{l}_{f}_{t}" for l, t, f in sel["occurrences"]}
    assert kept <= set(report.node_ids), kept - set(report.node_ids)
    assert all(report.on_screen[i] for i in kept)
    data = json.loads((graph_run / "graphs" / f"{slug}.json").read_text())
    assert set(report.node_ids) == {n["node_id"] for n in data["nodes"]}
    assert report.screenshot.stat().st_size > 10_000


@pytest.fixture(scope="module")
def toy_graph_run(tmp_path_factory, one_torch_thread):
    """Toy world: prune, interpret (store and corpus examples), graph with descriptions."""
    out = tmp_path_factory.mktemp("toy_graph")
    assert (
        main(["prune", "--n", "2", "--methods", "fap", "--k", "5", "--seeds", "0", "--out", str(out), "--no-progress"])
        == 0
    )
    sel = str(out / "selections.jsonl")
    assert (
        main(["interpret", "--selections", sel, "--examples", "store", "--out", str(out / "i_store"), "--no-progress"])
        == 0
    )
    assert (
        main(["interpret", "--selections", sel, "--n-docs", "120", "--out", str(out / "i_corpus"), "--no-progress"])
        == 0
    )
    for src in ("i_store", "i_corpus"):
        assert (
            main(
                [
                    "graph",
                    "--selections",
                    sel,
                    "--method",
                    "fap",
                    "--k",
                    "5",
                    "--all",
                    "--descriptions",
                    str(out / src / "descriptions.parquet"),
                    "--out",
                    str(out / f"g_{src}"),
                    "--no-progress",
                ]
            )
            == 0
        )
    return out


@pytest.mark.parametrize("src", ["i_store", "i_corpus"])
def test_feature_pages_and_labels(toy_graph_run, src):
    fm = pytest.importorskip(
        "circuit_tracer.frontend.feature_models", reason="pip install --no-deps circuit-tracer==0.5.0"
    )
    import pandas as pd
    import torch

    from pie_lib.clt import load_clt
    from pie_lib.clt.naming import cantor
    from pie_lib.models.loading import load_model
    from pie_lib.toy import toy_clt_path, toy_model_path

    out = toy_graph_run
    desc = pd.read_parquet(out / src / "descriptions.parquet").set_index(["layer", "feature"])["description"]
    gdir = out / f"g_{src}"
    feats = set()
    for f in gdir.glob("fap-k5-s0-p*.json"):
        g = json.loads(f.read_text())
        assert g["metadata"]["scan"] == "./data/features"
        for n in g["nodes"]:
            if n["feature_type"] == "cross layer transcoder":
                l, fi, _ = map(int, n["node_id"].split("_"))
                assert n["clerp"] == desc[(l, fi)]
                feats.add((l, fi))
    model = load_model(str(toy_model_path("llama")), device="cpu")
    clt = load_clt(str(toy_clt_path("llama")), device="cpu")
    W_U = model.hf.get_output_embeddings().weight.detach()
    for l, fi in feats:
        page = fm.Model.model_validate(json.loads((gdir / "features" / f"{cantor(l, fi)}.json").read_text()))
        assert page.index == cantor(l, fi) and page.examples_quantiles and page.act_max > 0
        ex = page.examples_quantiles[0].examples[0]
        assert len(ex.tokens) == len(ex.tokens_acts_list) and abs(ex.tokens_acts_list[ex.train_token_ind]) == max(
            abs(a) for a in ex.tokens_acts_list
        )
        scores = W_U @ clt.decoder_rows(l, torch.tensor([fi]))[0].sum(0)
        assert page.top_logits[0] == model.tokenizer.decode([int(scores.argmax())])
        assert page.bottom_logits[0] == model.tokenizer.decode([int(scores.argmin())])
        assert len(page.quantile_values) == 100 and 0 < page.activation_frequency <= 1


def test_clicking_a_feature_shows_its_examples_in_chromium(toy_graph_run):
    from pie_lib.clt.naming import cantor
    from pie_lib.graph.browser import load_graph_page, missing_requirements
    from pie_lib.graph.serve import start_viewer

    missing = missing_requirements()
    if missing:
        pytest.skip("no headless browser setup: " + "; ".join(missing) + " (make browser installs it)")
    gdir = toy_graph_run / "g_i_store"
    slug = json.loads((gdir / "graph-metadata.json").read_text())["graphs"][0]["slug"]
    node = next(
        n
        for n in json.loads((gdir / f"{slug}.json").read_text())["nodes"]
        if n["feature_type"] == "cross layer transcoder"
    )
    l, f, _ = map(int, node["node_id"].split("_"))
    page = json.loads((gdir / "features" / f"{cantor(l, f)}.json").read_text())
    viewer = start_viewer(gdir, port=0)
    try:
        report = load_graph_page(viewer.url.split("?")[0] + f"?slug={slug}&clickedId={node['node_id']}")
    finally:
        viewer.stop()
    text = " ".join(report.detail_text.split())
    assert node["clerp"][:20] in text  # the Stage II description
    assert page["top_logits"][0].strip() in text  # W_dec . W_U logits
    first = page["examples_quantiles"][0]["examples"][0]["tokens"]
    peak = first[page["examples_quantiles"][0]["examples"][0]["train_token_ind"]].strip()
    assert peak and peak in text  # an example context, from the feature page


def test_graph_refuses_other_checkpoints_than_the_run(graph_run, tiny_worlds, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(graph_run, run, ignore=shutil.ignore_patterns("graphs", "bad"))
    cfg = json.loads((run / "config.json").read_text())
    cfg["clt_hash"] = "0" * 64  # as if the CLT folder had changed since the run
    (run / "config.json").write_text(json.dumps(cfg))
    args = [
        "graph",
        "--selections",
        str(run / "selections.jsonl"),
        "--method",
        "fap",
        "--k",
        "6",
        "--all",
        "--out",
        str(run / "graphs"),
        "--no-progress",
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "clt loaded now differ" in err and "--model/--clt" in err and not (run / "graphs").exists()
    w = tiny_worlds["llama"]
    assert main(args + ["--clt", str(w.clt_dir)]) == 0  # an explicit override is allowed (with a warning)
    loaded = json.loads((run / "graphs" / "graph_config.json").read_text())["loaded"]
    assert loaded["clt_hash"] == json.loads((graph_run / "config.json").read_text())["clt_hash"]
    assert loaded["clt_source"] == {"path": str(w.clt_dir.resolve()), "revision": None}
