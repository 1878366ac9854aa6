"""Start-up of ``pie prune``'s model path under each model backend: imports, ``load_world``, one forward.

Each repeat is a fresh Python process (start-up is what is measured) that imports the prune path
(``pie_lib.prune.sweep``), loads the model and CLT with ``load_world(..., backend=B)`` and runs one
``run_with_cache``; it reports wall seconds per phase, the process's CPU seconds, and which of
transformers' modeling-stack modules ended up imported. The two backends' last-token logits of
that forward must be bitwise equal (exit 1 otherwise).

    python benchmarks/model_backends.py                       # the toy GPT-2
    python benchmarks/model_backends.py --model toy --clt toy # the toy Llama
    python benchmarks/model_backends.py --model M --clt C --repeats 5 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = (
    "transformers.modeling_utils",
    "torch._dynamo",
    "torch.distributed.tensor",
    "sympy",
    "scipy.optimize",
)

CHILD = r"""
import json, os, resource, sys, time
t0 = time.perf_counter()
import torch
from pie_lib.prune.sweep import run_prune  # noqa: F401  (the prune path's imports)
from pie_lib.world import load_world
from pie_lib.engine.traces import run_with_cache
t1 = time.perf_counter()
w = load_world(sys.argv[1], sys.argv[2], device="cpu", dtype="float32", backend=sys.argv[3])
t2 = time.perf_counter()
ids = torch.tensor([w.model.tokenize(["the cat sat on the mat"])[0]])
logits = run_with_cache(w.model, ids).last_logits
t3 = time.perf_counter()
ru = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({
    "backend": w.model.backend, "imports_s": t1 - t0, "load_world_s": t2 - t1, "forward_s": t3 - t2,
    "cpu_s": ru.ru_utime + ru.ru_stime, "heavy_modules": [m for m in HEAVY if m in sys.modules],
    "logits": logits.flatten().tolist(),
}))
"""


def run_once(model: str, clt: str, backend: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    code = f"HEAVY = {HEAVY!r}\n" + CHILD
    out = subprocess.run(
        [sys.executable, "-c", code, model, clt, backend], capture_output=True, text=True, env=env, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="toy:gpt2")
    ap.add_argument("--clt", default="toy:gpt2")
    ap.add_argument("--backends", default="native,hf")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None, help="write the summary here")
    a = ap.parse_args(argv)
    backends = [b.strip() for b in a.backends.split(",") if b.strip()]
    runs: dict[str, list[dict]] = {b: [] for b in backends}
    for _ in range(a.repeats):  # interleaved, so a change in the machine's load hits both alike
        for b in backends:
            runs[b].append(run_once(a.model, a.clt, b))
    summary: dict = {"model": a.model, "clt": a.clt, "repeats": a.repeats, "backends": {}}
    print(f"{a.model}: median of {a.repeats} fresh processes (1 thread)")
    print(f"{'backend':>8} {'loaded as':>9} {'imports':>8} {'load_world':>10} {'forward':>8} {'CPU':>6}  heavy modules")
    for b, rs in runs.items():
        med = {k: statistics.median(r[k] for r in rs) for k in ("imports_s", "load_world_s", "forward_s", "cpu_s")}
        heavy = sorted({m for r in rs for m in r["heavy_modules"]})
        summary["backends"][b] = {**med, "loaded_as": rs[0]["backend"], "heavy_modules": heavy}
        print(
            f"{b:>8} {rs[0]['backend']:>9} {med['imports_s']:7.2f}s {med['load_world_s']:9.2f}s "
            f"{med['forward_s']:7.3f}s {med['cpu_s']:5.2f}s  {', '.join(heavy) or '-'}"
        )
    firsts = [rs[0]["logits"] for rs in runs.values()]
    same = all(f == firsts[0] for f in firsts)
    summary["logits_equal"] = same
    print(f"last-token logits equal across backends: {same}")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(summary, indent=2) + "\n")
        print(f"wrote {a.json}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
