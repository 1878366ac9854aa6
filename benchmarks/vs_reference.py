"""pie_lib against the paper's reference implementation, end to end, on the same pairs.

One workload, one run, the same thread count for both: FAP and FAP-Synergy at K = 5, 10, 20 (by
default) on the IOI pairs of a small GPT-2 + CLT in circuit-tracer format (default: the toy
GPT-2 world, ``toy:gpt2``; ``--model/--clt/--data`` take any GPT-2 fixture).

- the reference: the official ``scripts/run_pruning.py``, run unmodified through the harness in
  ``../shared/reference-harness`` (``run_official.py``), once per (method, K) as the paper's code
  is used -- imports, loading and every prompt included in each run's wall time. FAP-Synergy runs
  as the harness's ``synergy-fp32`` variant (the reference's hard-coded bfloat16 autocast off), the
  one whose selections can be compared exactly with a float32 run.
- pie_lib: one ``pie prune`` process (imports, loading, every method, K and prompt), same pairs,
  same Synergy settings (lambda 3, boundary 25%, cap 32, 32 partners, 8 per candidate, seed 0),
  ``--min-tokens 8`` (the reference skips shorter prompts).

Both sides' selections are compared per (method, K, prompt) as sets of (layer, position, feature);
the script prints both wall times and the ratio (and both sides' CPU seconds, user + system of the
processes, which a loaded machine moves far less than wall seconds), writes ``--json``, and exits 1 when a selection
differs (``--allow-mismatch N`` tolerates N differing selections, e.g. float32 near-ties). When the
reference is not installed (no harness, no reference venv with circuit-tracer, or no official
code) it prints why and exits 0 without timing anything.

Example::

    python benchmarks/vs_reference.py --n 100 --json benchmarks/results/vs_reference_toy_gpt2.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
#: ../shared/reference-harness beside the checkout (a worktree one level deeper also finds it)
DEFAULT_HARNESS = next(
    (
        d / "shared" / "reference-harness"
        for d in (REPO.parent, REPO.parent.parent)
        if (d / "shared" / "reference-harness").is_dir()
    ),
    REPO.parent / "shared" / "reference-harness",
)
SYNERGY_FLAGS = {
    "lambda_syn": 3.0,
    "boundary_percent": 25.0,
    "boundary_cap": 32,
    "partners_per_refresh": 32,
    "syn_partners_per_candidate": 8,
    "syn_seed": 0,
}
MIN_TOKENS = 8  # the reference skips prompts shorter than this


# ---------------------------------------------------------------------------------------------- setup
def reference_missing(harness: Path, python: Path, official: Path) -> str | None:
    """Why the reference cannot run here, or None when it can."""
    if not (harness / "run_official.py").is_file() or not (harness / "offline_hf.py").is_file():
        return f"no reference harness at {harness} (run_official.py, offline_hf.py); pass --harness"
    if not (official / "scripts" / "run_pruning.py").is_file():
        return (
            f"no official PIE code at {official} (scripts/run_pruning.py); export the PIE-Pipeline repository "
            "there (see the harness README) or pass --official-dir"
        )
    if not python.is_file():
        return f"no reference python at {python}; build the venv of {harness / 'README.md'} or pass --reference-python"
    probe = subprocess.run(
        [str(python), "-c", "import circuit_tracer, transformer_lens"], capture_output=True, text=True
    )
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["?"])[-1]
        return f"{python} cannot import circuit_tracer / transformer_lens ({last}); install the harness requirements"
    return None


def _toy(name: str, kind: str) -> Path:
    if name.startswith("toy"):
        from pie_lib import toy

        arch = name.split(":", 1)[1] if ":" in name else "gpt2"
        return toy.toy_model_path(arch) if kind == "model" else toy.toy_clt_path(arch)
    return Path(name).expanduser()


def build_fixture(out: Path, model_dir: Path, clt_dir: Path, data: Path | None, n: int, task: str, seed: int) -> Path:
    """The harness's fixture layout from a GPT-2 model folder, a CLT folder and pairs.

    ``model/`` (config.json gains ``n_ctx``, which TransformerLens needs), ``tokenizer/`` (a plain
    ``PreTrainedTokenizerFast`` config, readable by the reference's transformers 4.x), ``clt/`` and
    ``ioi.jsonl``. Pairs come from ``--data`` or are generated with the model's own tokenizer.
    """
    cfg = json.loads((model_dir / "config.json").read_text())
    if cfg.get("model_type") != "gpt2":
        raise SystemExit(
            f"{model_dir}: model_type {cfg.get('model_type')!r}; the reference harness runs GPT-2 models only"
        )
    if cfg.get("n_inner") not in (None, 4 * cfg["n_embd"]):
        raise SystemExit(
            f"{model_dir}: MLP width {cfg['n_inner']} != 4 x d_model; TransformerLens rebuilds GPT-2 with 4x"
        )
    if out.exists():
        shutil.rmtree(out)
    (out / "model").mkdir(parents=True)
    (out / "tokenizer").mkdir()
    cfg.setdefault("n_ctx", cfg.get("n_positions", 1024))
    (out / "model" / "config.json").write_text(json.dumps(cfg, indent=2))
    for f in ("model.safetensors", "generation_config.json"):
        if (model_dir / f).exists():
            shutil.copy2(model_dir / f, out / "model" / f)
    tok_cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    specials = {
        k: tok_cfg[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token") if isinstance(tok_cfg.get(k), str)
    }
    tok_cfg = {
        **specials,
        "model_max_length": tok_cfg.get("model_max_length", cfg["n_ctx"]),
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,
    }
    for d in (out / "model", out / "tokenizer"):  # pie loads the tokenizer from the model folder
        shutil.copy2(model_dir / "tokenizer.json", d / "tokenizer.json")
        (d / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))
        (d / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
    shutil.copytree(clt_dir, out / "clt")
    if data is not None:
        shutil.copy2(data, out / "ioi.jsonl")
    else:
        from transformers import AutoTokenizer

        from pie_lib.data.pairs import save_pairs
        from pie_lib.data.tasks import generate_task

        tok = AutoTokenizer.from_pretrained(str(model_dir))
        save_pairs(generate_task(task, tok, n, seed=seed).pairs, out / "ioi.jsonl")
    return out


def _timed(cmd: list[str], **kw: Any) -> tuple[subprocess.CompletedProcess, float, float]:
    """Run ``cmd``; (the process, wall seconds, CPU seconds of it and its children: user + system).

    CPU seconds hardly move with the machine's load (wall seconds do, on a shared machine), so
    both are recorded; the ratio quoted is the wall one.
    """
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    p = subprocess.run(cmd, **kw)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    return p, wall, (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)


def _env(threads: int, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        TOKENIZERS_PARALLELISM="false",
        PYTHONWARNINGS="ignore",
        **extra,
    )
    return env


def _git_commit() -> str | None:
    """The checkout's commit (``-dirty`` when tracked files other than ``benchmarks/results`` -- earlier
    runs' JSONs -- differ from it), or None outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)benchmarks/results"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    sha = head.stdout.strip()
    return (sha + ("-dirty" if dirty.stdout.strip() else "")) or None


# ---------------------------------------------------------------------------------------------- runs
def run_reference(fx: Path, work: Path, a: argparse.Namespace, after_run=None) -> dict[str, Any]:
    """One official run per (method, K); returns wall times and per-prompt kept sets.

    ``after_run(i)`` is called after the i-th run (0-based): pie runs go in between, so a drift of
    the machine's load over the minutes the reference takes affects both sides alike.
    """
    hf_home = work / "hf-home"
    env = _env(
        a.threads,
        PIE_OFFICIAL_DIR=str(a.official_dir),
        HF_HOME=str(hf_home),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        PEER_THREADS=str(a.threads),
    )
    subprocess.run(
        [str(a.reference_python), str(a.harness / "offline_hf.py"), "--fixture", str(fx), "--hf_home", str(hf_home)],
        check=True,
        env=env,
        capture_output=True,
    )
    runs, kept = [], {}
    for k in a.k:
        for method in ("fap", "fap-synergy"):
            name = f"{method}_k{k}"
            record = work / "ref" / f"{name}.jsonl"
            record.parent.mkdir(parents=True, exist_ok=True)
            extra = (
                ["--synergy", "none"]
                if method == "fap"
                else ["--synergy", "boundary"] + [x for kv, v in SYNERGY_FLAGS.items() for x in (f"--{kv}", str(v))]
            )
            pre = ["--peer_synergy_fp32"] if method == "fap-synergy" else []
            cmd = [
                str(a.reference_python),
                str(a.harness / "run_official.py"),
                "--record",
                str(record),
                "--threads",
                str(a.threads),
                *pre,
                "--",
                "--model",
                "gpt2",
                "--transcoder_set",
                str(fx / "clt"),
                "--data_file",
                str(fx / "ioi.jsonl"),
                "--output_dir",
                str(work / "ref" / name),
                "--keep_topk",
                str(k),
                "--feat_budget_type",
                "global",
                "--dtype",
                "float32",
                "--kl_last_token",
                "--corruption",
                "corrupted_prompt",
                "--record_per_prompt",
                "--metric",
                "last_logit_diff_json",
                *extra,
            ]
            p, wall, cpu = _timed(cmd, env=env, capture_output=True, text=True)
            if p.returncode != 0:
                raise SystemExit(f"reference run {name} failed:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
            recs = [json.loads(line) for line in record.read_text().splitlines() if line.strip()]
            for r in recs:
                kept[(method, k, r["idx"])] = {tuple(o[:3]) for o in r["kept_final"]}
            runs.append({"run": name, "wall_seconds": wall, "cpu_seconds": cpu, "prompts": len(recs)})
            print(f"  reference {name:16s} {wall:7.1f} s  (CPU {cpu:6.1f} s, {len(recs)} prompts)", flush=True)
            if after_run is not None:
                after_run(len(runs) - 1)
    return {
        "runs": runs,
        "wall_seconds": sum(r["wall_seconds"] for r in runs),
        "cpu_seconds": sum(r["cpu_seconds"] for r in runs),
        "kept": kept,
    }


def run_pie(fx: Path, work: Path, a: argparse.Namespace) -> dict[str, Any]:
    """One ``pie prune`` process over every method and K."""
    out = work / "pie"
    if out.exists():
        shutil.rmtree(out)
    syn = SYNERGY_FLAGS
    cmd = [
        sys.executable,
        "-m",
        "pie_lib",
        "prune",
        "--model",
        str(fx / "model"),
        "--clt",
        str(fx / "clt"),
        "--data",
        str(fx / "ioi.jsonl"),  # every pair of the file (no --n)
        "--methods",
        "fap,fap-synergy",
        "--k",
        ",".join(map(str, a.k)),
        "--seeds",
        "0",
        "--min-tokens",
        str(MIN_TOKENS),
        "--lambda-syn",
        str(syn["lambda_syn"]),
        "--boundary-percent",
        str(syn["boundary_percent"]),
        "--boundary-cap",
        str(syn["boundary_cap"]),
        "--partners",
        str(syn["partners_per_refresh"]),
        "--partners-per-candidate",
        str(syn["syn_partners_per_candidate"]),
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--batch-size",
        str(a.batch_size),
        "--out",
        str(out),
        "--no-progress",
        *a.pie_args,
    ]
    env = _env(a.threads, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p, wall, cpu = _timed(cmd, env=env, capture_output=True, text=True, cwd=str(REPO))
    if p.returncode != 0:
        raise SystemExit(f"pie prune failed:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    kept = {}
    for line in (out / "selections.jsonl").read_text().splitlines():
        r = json.loads(line)
        kept[(r["method"], int(r["k"]), int(r["prompt_idx"]))] = {tuple(o) for o in r["occurrences"]}
    print(f"  pie prune (all methods and K)  {wall:7.1f} s  (CPU {cpu:5.1f} s, {len(kept)} selections)", flush=True)
    return {"wall_seconds": wall, "cpu_seconds": cpu, "kept": kept, "command": " ".join(cmd)}


def compare(ref: dict, pie: dict) -> dict[str, Any]:
    """Per (method, K, prompt): identical kept sets? Reports the differing keys and their Jaccard."""
    keys = sorted(set(ref) | set(pie))
    only_ref = [k for k in keys if k not in pie]
    only_pie = [k for k in keys if k not in ref]
    both = [k for k in keys if k in ref and k in pie]
    diff = [k for k in both if ref[k] != pie[k]]
    return {
        "compared": len(both),
        "identical": len(both) - len(diff),
        "differ": len(diff),
        "only_reference": len(only_ref),
        "only_pie": len(only_pie),
        "differing": [
            {
                "method": m,
                "k": k,
                "prompt": i,
                "jaccard": len(ref[(m, k, i)] & pie[(m, k, i)]) / max(1, len(ref[(m, k, i)] | pie[(m, k, i)])),
            }
            for m, k, i in diff[:20]
        ],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="toy:gpt2", help="GPT-2 model folder (default: the toy GPT-2)")
    p.add_argument("--clt", default="toy:gpt2", help="its CLT folder, circuit-tracer format")
    p.add_argument("--data", type=Path, default=None, help="pairs JSONL; default: generate --n pairs of --task")
    p.add_argument("--n", type=int, default=100, help="generated pairs")
    p.add_argument("--task", default="ioi", choices=("ioi", "docstring"))
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--k", type=lambda s: [int(x) for x in s.split(",")], default=[5, 10, 20])
    p.add_argument("--threads", type=int, default=1, help="torch threads of both sides")
    p.add_argument("--batch-size", type=int, default=64, help="pie prune --batch-size")
    p.add_argument("--pie-args", nargs=argparse.REMAINDER, default=[], help="extra pie prune flags (last)")
    p.add_argument("--harness", type=Path, default=Path(os.environ.get("PEER_HARNESS", DEFAULT_HARNESS)))
    p.add_argument(
        "--reference-python", type=Path, default=Path(os.environ.get("PEER_PYTHON", "/tmp/ref-venv/bin/python"))
    )
    p.add_argument("--official-dir", type=Path, default=Path(os.environ.get("PIE_OFFICIAL_DIR", "/tmp/pie-official")))
    p.add_argument("--work", type=Path, default=Path("/tmp/pie_vs_reference"), help="scratch folder (wiped)")
    p.add_argument("--pie-repeats", type=int, default=3, help="pie runs, spread over the reference runs (median)")
    p.add_argument("--allow-mismatch", type=int, default=0, help="differing selections tolerated before exit 1")
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    commit = _git_commit()  # now: the code the pie runs import, not whatever is checked out at the end

    why = reference_missing(a.harness, a.reference_python, a.official_dir)
    if why:
        print(f"SKIPPED: the reference implementation is not installed: {why}")
        return 0
    model_dir, clt_dir = _toy(a.model, "model"), _toy(a.clt, "clt")
    a.work.mkdir(parents=True, exist_ok=True)
    fx = build_fixture(a.work / "fixture", model_dir, clt_dir, a.data, a.n, a.task, a.data_seed)
    n_pairs = sum(1 for line in (fx / "ioi.jsonl").read_text().splitlines() if line.strip())
    print(
        f"vs_reference: {a.model} + {a.clt}, {n_pairs} pairs, FAP + FAP-Synergy at K={a.k}, {a.threads} thread(s), "
        f"float32, CPU; load average at start {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    load0 = os.getloadavg()
    n_ref = 2 * len(a.k)
    slots = (
        {round(j * n_ref / (a.pie_repeats - 1)) - 1 for j in range(1, a.pie_repeats)} if a.pie_repeats > 1 else set()
    )
    pies = [run_pie(fx, a.work, a)]  # before the reference, then interleaved with its runs
    ref = run_reference(fx, a.work, a, after_run=lambda i: pies.append(run_pie(fx, a.work, a)) if i in slots else None)
    pie_times = [p_["wall_seconds"] for p_ in pies]
    pie_cpu = [p_["cpu_seconds"] for p_ in pies]
    pie = {**pies[-1], "wall_seconds": statistics.median(pie_times), "cpu_seconds": statistics.median(pie_cpu)}
    cmp = compare(ref["kept"], pie["kept"])
    ratio = ref["wall_seconds"] / pie["wall_seconds"]
    cpu_ratio = ref["cpu_seconds"] / pie["cpu_seconds"]
    print(
        f"reference: {ref['wall_seconds']:.1f} s ({len(ref['runs'])} runs)   pie prune: median {pie['wall_seconds']:.2f} s "
        f"of {len(pie_times)} runs {[round(t, 1) for t in pie_times]}   ratio: {ratio:.1f}x"
    )
    print(
        f"CPU seconds (user + system): reference {ref['cpu_seconds']:.1f}, pie prune median {pie['cpu_seconds']:.2f} "
        f"of {[round(t, 1) for t in pie_cpu]}   CPU ratio: {cpu_ratio:.1f}x"
    )
    print(
        f"selections: {cmp['identical']}/{cmp['compared']} identical, {cmp['differ']} differ, "
        f"{cmp['only_reference']} only in the reference, {cmp['only_pie']} only in pie"
    )
    result = {
        "model": str(model_dir),
        "clt": str(clt_dir),
        "pairs": n_pairs,
        "k": a.k,
        "threads": a.threads,
        "reference_seconds": ref["wall_seconds"],
        "reference_runs": ref["runs"],
        "pie_seconds": pie["wall_seconds"],
        "pie_seconds_each": pie_times,
        "ratio": ratio,
        "reference_cpu_seconds": ref["cpu_seconds"],
        "pie_cpu_seconds": pie["cpu_seconds"],
        "pie_cpu_seconds_each": pie_cpu,
        "cpu_ratio": cpu_ratio,
        "pie_command": pie["command"],
        "selections": cmp,
        "loadavg_start": list(load0),
        "loadavg_end": list(os.getloadavg()),
        "hardware": {"cpu_count": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version()},
        "command": " ".join(["python", "benchmarks/vs_reference.py", *(argv if argv is not None else sys.argv[1:])]),
        "commit": commit,
    }
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(result, indent=2))
    bad = cmp["differ"] + cmp["only_reference"] + cmp["only_pie"]
    if bad > a.allow_mismatch:
        print(f"MISMATCH: {bad} selections differ or are missing (allowed {a.allow_mismatch})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
