"""`pie graph` link computation: one batched backward pass per batch of target nodes against one
backward pass per target node (the same numbers, checked), on the toy world.

Usage::

    python benchmarks/graph_links.py                     # toy llama, an IOI prompt, K=24 occurrences
    python benchmarks/graph_links.py --k 48 --batch-size 64 --json runs/bench/graph_links.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="llama")
    ap.add_argument("--k", type=int, default=24, help="kept occurrences (largest clean activations, position > 0)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    from pie_lib.clt import load_clt
    from pie_lib.data.tasks import generate_task
    from pie_lib.engine.graph import prompt_writes
    from pie_lib.graph.attribution import direct_effects
    from pie_lib.models.loading import load_model
    from pie_lib.toy import toy_clt_path, toy_model_path

    model = load_model(str(toy_model_path(a.arch)), device="cpu")
    clt = load_clt(str(toy_clt_path(a.arch)), device="cpu")
    pair = generate_task("ioi", model.tokenizer, 1, seed=0).pairs[0]
    ids = torch.tensor(model.tokenize([pair.text_clean])[0])
    acts = clt.encode(prompt_writes(model, ids).resid_mid)
    acts[:, 0] = 0
    flat = acts.flatten()
    top = flat.topk(a.k).indices
    T, F = acts.shape[1], acts.shape[2]
    occ = torch.stack([top // (T * F), (top // F) % T, top % F], dim=1)
    targets = torch.tensor([model.target_token(pair.io_clean), model.target_token(pair.s_clean)])

    def timed(bs: int) -> tuple[float, torch.Tensor]:
        best, adj = float("inf"), None
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            adj, _ = direct_effects(model, clt, ids, occ, targets, batch_size=bs)
            best = min(best, time.perf_counter() - t0)
        return best, adj

    t_batched, adj_b = timed(a.batch_size)
    t_single, adj_s = timed(1)
    agree = float((adj_b - adj_s).abs().max())
    res = {
        "arch": a.arch,
        "tokens": T,
        "k": a.k,
        "targets": a.k + 2,
        "batch_size": a.batch_size,
        "seconds_batched": t_batched,
        "seconds_one_target_per_pass": t_single,
        "speedup": t_single / t_batched,
        "max_abs_difference": agree,
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(res, indent=2))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(res, indent=2))
    if agree > 1e-4 * (1 + float(adj_s.abs().max())):
        raise SystemExit("batched and per-target links disagree")


if __name__ == "__main__":
    main()
