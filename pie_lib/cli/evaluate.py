"""``pie evaluate``: FADE scores of the descriptions (stage III).

The handler returns an exit code: 0 done, 1 done except for features whose LLM requests failed
(rerun to finish them); a ``PieError`` propagates to :func:`pie_lib.cli.app.main` (exit 2).
"""

from __future__ import annotations

import argparse
from typing import Any

from pie_lib.cli.args import add_llm_flags, add_world_flags, llm_config


def add_evaluate_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``pie evaluate``: FADE scores of the descriptions."""
    p = subparsers.add_parser(
        "evaluate",
        help="score descriptions with FADE metrics (stage III)",
        description="Clarity, Responsiveness, Purity, Faithfulness of every description (fade_<protocol>.parquet). "
        "Resumable: rerun to finish.",
    )
    p.add_argument("--descriptions", required=True, help="descriptions.parquet written by `pie interpret`")
    p.add_argument(
        "--protocol",
        choices=("pie", "fade"),
        default="pie",
        help="pie: 10 top + 10 random rated, 5 generated texts (default); fade: ~500 rated, 15 generations",
    )
    add_world_flags(p, "default: those recorded by `pie interpret`")
    p.add_argument("--max-features", type=int, default=None, help="evaluate only the first N features")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    add_llm_flags(p)
    p.add_argument("--out", default=None, help="output folder (default: the descriptions' folder)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run_evaluate)
    return p


def run_evaluate(args: argparse.Namespace) -> int:
    """Handler of ``pie evaluate``."""
    from pie_lib.engine.remote import request_count
    from pie_lib.evaluate.protocol import ProtocolConfig, evaluate

    pc = ProtocolConfig.named(args.protocol)
    pc.seed = args.seed
    before = request_count()
    from pathlib import Path

    from pie_lib.store import own_folder

    if args.out is not None:
        out = Path(args.out)
    else:  # evaluate writes next to the descriptions by default
        d = Path(args.descriptions)
        out = d if d.is_dir() else d.parent
    with own_folder(out, what="pie evaluate", jsonl=()):  # one writer per folder
        table = evaluate(
            args.descriptions,
            protocol=pc,
            llm=llm_config(args),
            model=args.model,
            clt=args.clt,
            device=args.device,
            remote=args.remote,
            model_backend=args.model_backend,
            out=args.out,
            max_features=args.max_features,
            progress=not args.no_progress,
        )
    means = table[["clarity", "responsiveness", "purity", "faithfulness"]].mean(numeric_only=True).round(3).to_dict()
    print(
        f"{len(table)} features scored ({args.protocol}); means {means}; status {table['status'].value_counts().to_dict()}"
    )
    if args.remote:
        print(f"remote requests: {request_count() - before}")
    return 1 if (table["status"] == "request_failed").any() else 0
