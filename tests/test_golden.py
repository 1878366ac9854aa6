"""Golden regression: selections and KLs of the core methods on the embedded toy world.

The fixture ``tests/golden/prune_toy.json`` was produced by the code before the layout
restructure (issue 12). Any refactor must reproduce it: the kept occurrences of every
(method, K, seed, prompt) exactly, every KL (and the other evaluation numbers) within 1e-6.

Regenerate (only when a behaviour change is intended, and say so in the commit):
    PIE_GOLDEN_REGEN=1 python -m pytest tests/test_golden.py
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from pie_lib.prune.sweep import PruneConfig, load_results, load_selections, run_prune

FIXTURE = Path(__file__).parent / "golden" / "prune_toy.json"
METHODS = ["fap", "fap-synergy", "clt-relp", "act-mag", "random", "fap-signal"]
#: (toy arch, task): both architectures, both tasks of the paper
CASES = [("llama", "ioi"), ("llama", "docstring"), ("gpt2", "ioi"), ("gpt2", "docstring")]
NUMBERS = ["kl", "kl_null", "faithfulness", "completeness", "m_clean", "m_null", "m_circuit", "m_complement"]
INTS = ["n_active", "k_eff", "n_kept"]
TOL = 1e-6


def _run(arch: str, task: str, out: Path) -> dict:
    cfg = PruneConfig(
        model=f"toy:{arch}",
        clt=f"toy:{arch}",
        task=task,
        n=3,
        data_seed=0,
        methods=METHODS,
        k=[4, 12],
        k_frac=[],
        seeds=[0, 1],
        out=str(out),
        device="cpu",
        batch_size=3,
        progress=False,
    )
    run_prune(cfg)
    rows = load_results(out).sort_values(["method", "k", "seed", "prompt_idx"])
    sels = sorted(load_selections(out), key=lambda r: (r["method"], r["k"], r["seed"], r["prompt_idx"]))
    return {
        "rows": [
            {
                "key": [r.method, int(r.k), int(r.seed), int(r.prompt_idx)],
                **{c: float(getattr(r, c)) for c in NUMBERS},
                **{c: int(getattr(r, c)) for c in INTS},
                "pred_change": bool(r.pred_change),
            }
            for r in rows.itertuples()
        ],
        "selections": [
            {
                "key": [s["method"], int(s["k"]), int(s["seed"]), int(s["prompt_idx"])],
                "occurrences": s["occurrences"],
                "scores": s["scores"],
            }
            for s in sels
        ],
    }


@pytest.fixture(scope="module")
def produced(tmp_path_factory) -> dict:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        root = tmp_path_factory.mktemp("golden")
        return {f"{a}/{t}": _run(a, t, root / f"{a}_{t}") for a, t in CASES}
    finally:
        torch.set_num_threads(n)


def test_golden_fixture(produced) -> None:
    if os.environ.get("PIE_GOLDEN_REGEN") == "1":
        FIXTURE.write_text(json.dumps(produced, indent=None, separators=(",", ":")) + "\n")
        pytest.skip(f"regenerated {FIXTURE}")
    golden = json.loads(FIXTURE.read_text())
    assert sorted(produced) == sorted(golden)
    for case, want in golden.items():
        got = produced[case]
        assert [r["key"] for r in got["rows"]] == [r["key"] for r in want["rows"]], case
        for g, w in zip(got["rows"], want["rows"]):
            for c in INTS + ["pred_change"]:
                assert g[c] == w[c], (case, w["key"], c)
            for c in NUMBERS:
                assert math.isclose(g[c], w[c], rel_tol=0, abs_tol=TOL) or (math.isnan(g[c]) and math.isnan(w[c])), (
                    case,
                    w["key"],
                    c,
                    g[c],
                    w[c],
                )
        assert [s["key"] for s in got["selections"]] == [s["key"] for s in want["selections"]], case
        for g, w in zip(got["selections"], want["selections"]):
            assert g["occurrences"] == w["occurrences"], (case, w["key"])
            assert len(g["scores"]) == len(w["scores"])
            for a, b in zip(g["scores"], w["scores"]):
                assert math.isclose(a, b, rel_tol=0, abs_tol=TOL), (case, w["key"], a, b)


def test_golden_fixture_is_informative() -> None:
    """The fixture must exercise every method, both budgets and non-trivial selections."""
    golden = json.loads(FIXTURE.read_text())
    for case, want in golden.items():
        assert {r["key"][0] for r in want["rows"]} == set(METHODS), case
        assert {r["key"][1] for r in want["rows"]} == {4, 12}, case
        assert all(len(s["occurrences"]) > 0 for s in want["selections"]), case
        kls = {r["key"][0]: r["kl"] for r in want["rows"] if r["key"][1] == 12}
        assert len(set(kls.values())) > 1, case  # methods differ
