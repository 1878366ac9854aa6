"""Cost of the methods beyond the paper against FAP and FAP-Synergy: forwards and seconds per prompt.

Every (method, K) selects on a fresh batch context (no method profits from another's cached
gradients or patch effects); the shared context (clean + corrupted forwards, active set, decoder
rows) is its own row. Forwards are sequences through the model (a forward with its backward
counts once), counted by :func:`pie_lib.engine.attribution.count_forwards`.

Usage::

    python benchmarks/beyond_costs.py                       # toy world, IOI, 16 prompts, K = 8, 25, 50
    python benchmarks/beyond_costs.py --task docstring --k 8,16 --json runs/bench/beyond_costs.json
    python benchmarks/beyond_costs.py --model meta-llama/Llama-3.2-1B --clt mntss/clt-llama-3.2-1b-524k --device cuda
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

METHODS = "fap,fap-synergy,fap-ig,fap-iterative,greedy-refine"


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="toy")
    ap.add_argument("--clt", default="toy")
    ap.add_argument("--device", default=None)
    ap.add_argument("--task", default="ioi", choices=["ioi", "docstring"])
    ap.add_argument("--n", type=int, default=16, help="prompts")
    ap.add_argument("--k", default="8,25,50", help="budgets")
    ap.add_argument("--methods", default=METHODS)
    ap.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="method parameter (ig_steps=16)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None, help="also write the rows here")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)

    from pie_lib.experiments.beyond import method_costs
    from pie_lib.experiments.runs import load_world

    world = load_world(a.model, a.clt, a.device)
    extra = dict(p.split("=", 1) for p in a.param)
    ks = [int(x) for x in a.k.split(",") if x.strip()]
    df = method_costs(world, a.task, a.methods.split(","), ks, n=a.n, extra=extra)
    print(df.to_string(index=False, float_format=lambda x: f"{x:.4g}"))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(df.to_dict(orient="records"), indent=2, default=float), encoding="utf-8")
    return df.to_dict(orient="records")


if __name__ == "__main__":
    main()
