"""Smoke tests of the benchmarks: they run at tiny scale on CPU, and pie_lib equals the naive loop.

Each benchmark is called in-process through its ``main(argv)`` at sizes that take seconds. The
agreement check compares pie_lib's vectorised / batched prune stage with the per-occurrence,
per-forward reference of ``benchmarks/naive_reference.py``: FAP scores, FAP-Synergy selections,
every (method, K) selection of the ladder, and the KLs / faithfulness of the evaluation.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import prune_speed  # noqa: E402
import real_scale  # noqa: E402

TINY = ["--n", "2", "--batch-size", "2", "--repeats", "1", "--warmup", "0", "--threads", "1"]


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _assert_agree(result: dict) -> None:
    check = result["check"]
    assert check["ok"], check["mismatches"]
    assert check["selections_equal"] == check["selections_total"] > 0
    assert check["syn_equal"]
    assert check["fap_max_rel_err"] < 1e-4 and check["kl_max_abs_err"] < 1e-3


def test_prune_speed_synthetic_world_agrees_with_naive(tmp_path):
    out = tmp_path / "bench.json"
    result = prune_speed.main(
        TINY
        + [
            "--world",
            "synthetic",
            "--cache",
            str(tmp_path / "cache"),
            "--active-per-token",
            "24",
            "--k",
            "5,20",
            "--k-frac",
            "0.5",
            "--syn-k",
            "20",
            "--json",
            str(out),
        ]
    )
    _assert_agree(result)
    saved = json.loads(out.read_text())
    assert saved["n_prompts"] == 2
    sec = saved["pie"]["seconds_per_prompt"]
    for phase in ("setup", "grad", "fap", "synergy", "select[fap-synergy]", "evaluate", "total"):
        assert sec[phase] >= 0
    assert saved["naive"]["seconds_per_prompt"]["evaluate"] > 0
    assert saved["naive_forwards_per_prompt"] > saved["pie_forwards_per_prompt"]


def test_naive_synergy_matches_with_wide_boundary(tmp_path):
    """bp=100 puts many candidates (and pair forwards) in the boundary: still identical."""
    from naive_reference import NaiveReference

    from pie_lib.clt import load_clt
    from pie_lib.models.loading import load_model
    from pie_lib.prune.context import BatchContext, ScoringConfig
    from pie_lib.prune.scores import fap_scores
    from pie_lib.prune.select import SynergyConfig, synergy_rerank

    torch.set_num_threads(1)
    model_dir, clt_dir = prune_speed.build_synthetic_world(tmp_path / "w", active_per_token=16)
    model = load_model(model_dir, device="cpu")
    clt = load_clt(clt_dir)
    batch = prune_speed.ioi_batches(model, 2, seed=3, batch_size=2)[0]
    ctx = BatchContext(model, clt, batch, ScoringConfig())
    s = fap_scores(ctx.occ, ctx.grads("replacement"), ctx.rows)
    nv = NaiveReference(ctx)
    s_naive = nv.fap_scores()
    torch.testing.assert_close(s_naive, s, rtol=1e-4, atol=1e-5 * float(s.abs().max()))
    cfg = SynergyConfig(lam=5.0, boundary_percent=100.0, boundary_cap=24, seed=1)
    assert torch.equal(nv.synergy(s_naive, [16] * batch.size, cfg), synergy_rerank(ctx.evaluator, s, 16, cfg))
    assert nv.counters.forwards > 0


@pytest.mark.parametrize("shape", ["llama-3.2-1b", "gemma-2-2b"])
def test_real_scale_reduced_runs_and_agrees(tmp_path, shape):
    out = tmp_path / "rs.json"
    result = real_scale.main(
        TINY
        + [
            "--shape",
            shape,
            "--scale",
            "64",
            "--active-per-token",
            "24",
            "--cache",
            str(tmp_path / "cache"),
            "--k",
            "5,10",
            "--syn-k",
            "10",
            "--dtype",
            "float32",  # the naive agreement check is exact to float32 rounding; the default is bf16
            "--naive",
            "--json",
            str(out),
        ]
    )  # every build goes through the layer-by-layer (streamed) writer
    _assert_agree(result)
    saved = json.loads(out.read_text())
    assert saved["scale"] == 64 and saved["build"]["active_per_token_measured"] > 0
    assert saved["shape"] == shape and saved["n"] == 2 and saved["device"] == "cpu" and saved["dtype"] == "float32"
    assert saved["seconds_per_prompt"]["total"] > 0 and saved["total_seconds"] > 0 and saved["peak_memory_bytes"] > 0
    assert saved["projected_minutes_for_500_pairs"]["total"] > 0
    # the cached build is reused, not rebuilt
    again = real_scale.main(
        TINY
        + [
            "--shape",
            shape,
            "--scale",
            "64",
            "--active-per-token",
            "24",
            "--cache",
            str(tmp_path / "cache"),
            "--k",
            "5",
            "--syn-k",
            "5",
            "--dtype",
            "float32",
        ]
    )
    assert again["build"]["build_seconds"] == saved["build"]["build_seconds"]


def test_real_scale_shapes_divide():
    arch, cfg, F = real_scale.scaled_shape("llama-3.2-1b", 1)
    assert (arch, cfg["num_hidden_layers"], cfg["hidden_size"], cfg["vocab_size"], F) == (
        "llama",
        16,
        2048,
        128256,
        32768,
    )
    arch, cfg, F = real_scale.scaled_shape("gemma-2-2b", 16)
    assert (arch, cfg["num_hidden_layers"], cfg["hidden_size"], F) == ("gemma2", 2, 144, 1024)
    assert cfg["num_attention_heads"] % cfg["num_key_value_heads"] == 0


def test_model_backends_start_up(tmp_path):
    """Both backends load the toy GPT-2 in fresh processes, the native one without the modeling stack."""
    import model_backends

    out = tmp_path / "mb.json"
    assert model_backends.main(["--repeats", "1", "--json", str(out)]) == 0
    summary = json.loads(out.read_text())
    assert summary["logits_equal"]
    assert summary["backends"]["native"]["loaded_as"] == "native"
    assert summary["backends"]["native"]["heavy_modules"] == []
    assert "transformers.modeling_utils" in summary["backends"]["hf"]["heavy_modules"]


def test_patch_offsets_benchmark_replays_bitwise(tmp_path):
    """benchmarks/patch_offsets.py on the toy GPT-2: every replayed run() gives the same bits with
    sparse and with dense offsets, and the JSON says so."""
    import patch_offsets

    out = tmp_path / "po.json"
    prune = ["--model", "toy:gpt2", "--clt", "toy:gpt2", "--task", "ioi", "--n", "4", "--methods", "fap,fap-synergy"]
    prune += ["--k", "4,12", "--device", "cpu", "--out", str(tmp_path / "run"), "--no-progress"]
    result = patch_offsets.main(["--repeats", "1", "--json", str(out), "--", *prune])
    assert result["bitwise_equal"] and result["run_calls"] > 0
    assert json.loads(out.read_text())["bitwise_equal"] is True


def test_pahq_precision_benchmark_runs(capsys):
    """benchmarks/pahq_precision.py end to end at a tiny size (it once called a PatchEvaluator method
    that no longer existed): the row with every source layer in float32 has KL exactly 0 against full precision."""
    import pahq_precision

    pahq_precision.main(["--pairs", "4", "--k", "10,50", "--repeats", "1", "--threads", "1"])
    out = capsys.readouterr().out
    assert "full precision" in out and "KL(fp32||pahq) mean 0.00e+00 max 0.00e+00" in out
