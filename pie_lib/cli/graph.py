"""``pie graph``: circuits as attribution graphs for circuit-tracer's viewer, and ``--serve`` to view them."""

from __future__ import annotations

import argparse
import time


def add_graph_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "graph",
        help="write circuits as circuit-tracer graph files, or serve them (--serve)",
        description="Per prompt, <out>/<method>-k<K>-s<seed>-p<prompt_idx>.json in circuit-tracer's graph schema "
        "(nodes: kept occurrences, token embeddings, error nodes, the metric's logits; links: direct "
        "effects in the replacement setting) plus graph-metadata.json. `pie graph --serve DIR` shows "
        "them in circuit-tracer's viewer.",
    )
    p.add_argument(
        "--serve", metavar="DIR", default=None, help="serve the graph folder DIR on 127.0.0.1 and print the URL"
    )
    p.add_argument("--port", type=int, default=8032, help="port of --serve (default 8032; 0 = any free port)")
    p.add_argument("--selections", help="selections.jsonl of a `pie prune` folder (its config.json beside it)")
    p.add_argument("--method", help="method of the circuits (e.g. fap-synergy)")
    p.add_argument("--k", type=float, help="budget K of the circuits")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--prompt-idx", type=int, default=None, help="one prompt")
    which.add_argument("--all", action="store_true", help="every prompt of (method, K, seed)")
    p.add_argument("--seed", type=int, default=None, help="sweep seed (required when the selections hold several)")
    p.add_argument(
        "--descriptions",
        default=None,
        help="descriptions.parquet of `pie interpret`: node labels and feature pages (examples, logits)",
    )
    p.add_argument("--model", default=None, help="model folder or hub id (default: the run's config.json)")
    p.add_argument("--clt", default=None, help="CLT folder or hub id (default: the run's config.json)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument(
        "--model-backend",
        choices=("auto", "native", "hf"),
        default="auto",
        help="model code: native (pie_lib's own GPT-2 / Llama / Gemma-2), hf (transformers), auto (native for a local "
        "GPT-2 / Llama / Gemma-2 folder, hf otherwise; default)",
    )
    p.add_argument(
        "--edge-threshold",
        type=float,
        default=0.01,
        help="keep links with |weight| >= this fraction of the graph's largest |weight| (default 0.01)",
    )
    p.add_argument("--batch-size", type=int, default=32, help="target nodes per backward pass (default 32)")
    p.add_argument("--no-error-nodes", action="store_true", help="leave out the MLP reconstruction-error nodes")
    p.add_argument("--out", default=None, help="output folder, e.g. DIR/graphs")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_graph_command)


def run_graph_command(a: argparse.Namespace) -> int:
    from pie_lib.errors import SettingError

    if a.serve is not None:
        return _serve(a.serve, a.port)
    missing = [
        f
        for f, v in (("--selections", a.selections), ("--method", a.method), ("--k", a.k), ("--out", a.out))
        if v is None
    ]
    if missing:
        raise SettingError(f"pie graph needs {', '.join(missing)} (or --serve DIR to view written graphs)")
    from pie_lib.graph.attribution import GraphConfig
    from pie_lib.graph.export import GraphRunConfig, run_graph

    cfg = GraphRunConfig(
        selections=a.selections,
        method=a.method,
        k=a.k,
        out=a.out,
        prompt_idx=a.prompt_idx,
        all_prompts=a.all,
        seed=a.seed,
        descriptions=a.descriptions,
        model=a.model,
        clt=a.clt,
        device=a.device,
        model_backend=a.model_backend,
        graph=GraphConfig(edge_threshold=a.edge_threshold, batch_size=a.batch_size, error_nodes=not a.no_error_nodes),
        progress=not a.no_progress,
    )
    files = run_graph(cfg)
    print(
        f"wrote {len(files)} graph(s) to {a.out} (graph-metadata.json lists them); view with: pie graph --serve {a.out}"
    )
    return 0


def _serve(folder: str, port: int) -> int:
    from pie_lib.graph.serve import start_viewer

    viewer = start_viewer(folder, port=port)
    print(f"serving {folder} with circuit-tracer's viewer at {viewer.url}  (Ctrl-C to stop)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        viewer.stop()
        return 0
