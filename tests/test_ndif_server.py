"""Against a REAL NDIF server (ndif 0.1.2 on this machine, CPU, loopback only): ``pytest -m ndif``.

Starts the stack from ``../shared/ndif/ndif-local.sh`` (or reuses one that is up), deploying the
toy GPT-2 in float32, then runs ``pie prune --remote`` (FAP and FAP-Synergy, a few prompts) and
``pie interpret --remote`` and ``pie evaluate --remote`` as a user would (through ``tests/ndif_client.py``, which only seeds
nnsight's offline model-id cache) and the same commands locally. Selections and examples must be
equal, KLs within 1e-5. Skipped, with the reason, where the stack cannot start (not root, no
``ip netns``, no CPython 3.12, no script). Not part of the default run: it takes ~2-4 minutes
(~90 s to start the stack, ~3 min and ~5.5 GB once to install the server's venv).

Environment: ``PIE_NDIF_DIR`` (folder of ndif-local.sh; default ``<repo>/../shared/ndif``),
``ROOT`` / ``VENV`` / ``NS`` as the script reads them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

pytestmark = pytest.mark.ndif

REPO = Path(__file__).resolve().parents[1]
SCRIPT_DIR = Path(os.environ.get("PIE_NDIF_DIR", REPO.parent / "shared" / "ndif"))
SCRIPT = SCRIPT_DIR / "ndif-local.sh"
ROOT = Path(os.environ.get("ROOT", Path(os.environ.get("TMPDIR", "/tmp")) / "ndif-local"))
NS = os.environ.get("NS", "ndifrepro")
HOST = "http://127.0.0.1:18001"
TOY_GPT2 = REPO / "pie_lib" / "toy" / "assets" / "gpt2"


def _python312() -> str | None:
    found = shutil.which("python3.12")
    if found:
        return found
    try:
        root = subprocess.run(["pyenv", "root"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None
    hits = sorted(Path(root).glob("versions/3.12*/bin/python3.12")) if root else []
    return str(hits[0]) if hits else None


def _why_not() -> str | None:
    if not SCRIPT.exists():
        return f"no NDIF stack script at {SCRIPT} (set PIE_NDIF_DIR)"
    if os.geteuid() != 0:
        return "the local NDIF stack needs root (ip netns)"
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2) for the network namespace"
    if _python312() is None and not (ROOT / "venv" / "bin" / "ndif").exists():
        return "no CPython 3.12 for the NDIF server's venv"
    if not (TOY_GPT2 / "model" / "config.json").exists():
        return "the toy GPT-2 is not built (python -m pie_lib.toy.build)"
    return None


def _up() -> bool:
    r = subprocess.run(
        ["ip", "netns", "exec", NS, "curl", "-sf", "-m", "3", f"{HOST}/connected"], capture_output=True, text=True
    )
    return r.returncode == 0


def _deployed_model() -> Path:
    return ROOT / "models" / "tiny-gpt2"


@pytest.fixture(scope="module")
def stack():
    reason = _why_not()
    if reason:
        pytest.skip(reason)
    started = False
    if not _up():
        env = {**os.environ, "KEEP": "1", "MODEL_SRC": str(TOY_GPT2 / "model"), "ROOT": str(ROOT), "NS": NS}
        if _python312():
            env["PY312"] = _python312()
        r = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=1500)
        if r.returncode != 0 or not _up():
            subprocess.run(["bash", str(SCRIPT), "stop"], env=env, capture_output=True, timeout=120)
            pytest.skip("the NDIF stack did not start: " + (r.stdout + r.stderr).strip().splitlines()[-1][:200])
        started = True
    model = _deployed_model()
    if not (model / "config.json").exists():
        pytest.skip(f"the running stack deployed no model at {model}; stop it (ndif-local.sh stop) and rerun")
    yield model
    if started and os.environ.get("PIE_NDIF_KEEP") != "1":
        subprocess.run(
            ["bash", str(SCRIPT), "stop"],
            capture_output=True,
            timeout=120,
            env={**os.environ, "ROOT": str(ROOT), "NS": NS},
        )


def _pie(args: list[str], remote_model: Path | None = None) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    if remote_model is None:
        cmd = [sys.executable, "-m", "pie_lib", *args]
    else:
        cmd = [
            "ip",
            "netns",
            "exec",
            NS,
            "env",
            f"NDIF_HOST={HOST}",
            sys.executable,
            str(REPO / "tests" / "ndif_client.py"),
            str(remote_model),
            *args,
        ]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    return r.stdout + r.stderr


def _requests(output: str) -> int:
    m = re.search(r"remote requests: (\d+)", output)
    assert m, "the remote run did not print its number of requests"
    return int(m.group(1))


def test_prune_and_interpret_against_the_real_server(stack, tmp_path):
    model, clt = str(stack), str(TOY_GPT2 / "clt")
    prune = [
        "prune",
        "--model",
        model,
        "--clt",
        clt,
        "--task",
        "ioi",
        "--n",
        "6",
        "--methods",
        "fap,fap-synergy",
        "--k",
        "4,12",
        "--seeds",
        "0",
        "--no-progress",
    ]
    out_r = _pie([*prune, "--remote", "--out", str(tmp_path / "pr")], remote_model=stack)
    _pie([*prune, "--device", "cpu", "--out", str(tmp_path / "pl")])
    n_prune = _requests(out_r)
    cfg = json.loads((tmp_path / "pr" / "config.json").read_text())
    assert cfg["remote"]["server_dtype"] == "float32" and cfg["remote"]["requests"] == n_prune
    rr, rl = pd.read_parquet(tmp_path / "pr" / "results.parquet"), pd.read_parquet(tmp_path / "pl" / "results.parquet")
    keys = ["method", "k", "seed", "prompt_idx", "n_active", "n_kept", "pred_change"]
    assert len(rr) == len(rl) == 6 * 2 * 2 and rr[keys].equals(rl[keys])
    assert (rr["kl"] - rl["kl"]).abs().max() <= 1e-5

    def sel(p):
        return [
            (r["method"], r["k"], r["prompt_idx"], r["occurrences"])
            for r in map(json.loads, (p / "selections.jsonl").read_text().splitlines())
        ]

    assert sel(tmp_path / "pr") == sel(tmp_path / "pl")

    interp = [
        "interpret",
        "--model",
        model,
        "--clt",
        clt,
        "--selections",
        str(tmp_path / "pr" / "selections.jsonl"),
        "--method",
        "fap-synergy",
        "--k",
        "4",
        "--n-docs",
        "200",
        "--no-progress",
    ]
    out_i = _pie([*interp, "--remote", "--out", str(tmp_path / "ir")], remote_model=stack)
    _pie([*interp, "--device", "cpu", "--out", str(tmp_path / "il")])
    n_interp = _requests(out_i)
    for name in ("features.parquet", "descriptions.parquet", "examples/examples.parquet"):
        a, b = pd.read_parquet(tmp_path / "ir" / name), pd.read_parquet(tmp_path / "il" / name)
        pd.testing.assert_frame_equal(a, b, check_exact=False, atol=1e-5, rtol=0)

    # stage III: activations and steered generation (nnsight generate) on the server
    ev = ["evaluate", "--model", model, "--clt", clt, "--max-features", "3", "--no-progress"]
    out_e = _pie(
        [
            *ev,
            "--remote",
            "--descriptions",
            str(tmp_path / "ir" / "descriptions.parquet"),
            "--out",
            str(tmp_path / "er"),
        ],
        remote_model=stack,
    )
    _pie(
        [
            *ev,
            "--device",
            "cpu",
            "--descriptions",
            str(tmp_path / "il" / "descriptions.parquet"),
            "--out",
            str(tmp_path / "el"),
        ]
    )
    n_eval = _requests(out_e)
    a, b = pd.read_parquet(tmp_path / "er" / "fade_pie.parquet"), pd.read_parquet(tmp_path / "el" / "fade_pie.parquet")
    pd.testing.assert_frame_equal(a, b, check_exact=False, atol=1e-5, rtol=0)
    print(f"real NDIF server: prune {n_prune} requests, interpret {n_interp}, evaluate {n_eval}")


def test_an_unseen_model_and_clt_keep_the_local_occurrences(stack, tmp_path):
    """A Llama and a CLT built just now (random weights: nothing the project has seen), deployed into
    the running server, pruned remotely with every gradient mode: the local run's selections."""
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import build_world

    root = ROOT / "models" / "unseen-llama"
    shutil.rmtree(root, ignore_errors=True)
    w = build_world(root, "llama", seed=11)
    key = json.dumps({"repo_id": str(w.model_dir), "revision": None, "task": "text-generation"})
    yaml = tmp_path / "unseen.yaml"
    yaml.write_text(
        "models:\n"
        f"  - checkpoint: {w.model_dir}\n"
        f"    model_key: 'nnsight.modeling.transformers.TransformersModel:{key}'\n"
        "    task: text-generation\n"
        f"    size_bytes: {(w.model_dir / 'model.safetensors').stat().st_size}\n"
        "    dtype: float32\n    pinned: true\n"
    )
    r = subprocess.run(
        ["ip", "netns", "exec", NS, "bash", "-c", f"source {ROOT}/env.sh && ndif deploy -f {yaml}"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0 and "ready" in r.stdout + r.stderr, (r.stdout + r.stderr)[-2000:]
    prune = [
        "prune",
        "--model",
        str(w.model_dir),
        "--clt",
        str(w.clt_dir),
        "--data",
        str(w.pairs_path),
        "--n",
        "8",
        "--methods",
        "fap,fap-synergy,clt-relp,fap-full,random",
        "--k",
        "2,4,8",
        "--seeds",
        "0,1",
        "--no-progress",
    ]
    out = _pie([*prune, "--remote", "--out", str(tmp_path / "r")], remote_model=w.model_dir)
    _pie([*prune, "--device", "cpu", "--out", str(tmp_path / "l")])
    rr, rl = pd.read_parquet(tmp_path / "r" / "results.parquet"), pd.read_parquet(tmp_path / "l" / "results.parquet")
    assert len(rr) == len(rl) == 8 * 5 * 3 * 2
    assert (rr["kl"] - rl["kl"]).abs().max() <= 1e-5

    def sel(p):
        return [
            (r["method"], r["k"], r["seed"], r["prompt_idx"], r["occurrences"])
            for r in map(json.loads, (p / "selections.jsonl").read_text().splitlines())
        ]

    assert sel(tmp_path / "r") == sel(tmp_path / "l")
    print(f"unseen Llama on the real server: {len(rr)} rows equal, {_requests(out)} requests")
