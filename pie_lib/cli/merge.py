"""``pie merge``: combine the shards of a sweep (``pie prune --shard I/N``) into one folder."""

from __future__ import annotations

import argparse


def add_merge_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "merge",
        help="combine OUT/shards/shard-I-of-N into OUT (as one unsharded pie prune run)",
        description="Combine the shards written by `pie prune ... --shard I/N` into OUT/results.parquet and "
        "OUT/selections.jsonl, row for row what one unsharded run writes. Every shard must have finished.",
    )
    p.add_argument("--out", required=True, help="the --out folder the shards were run with")
    p.set_defaults(func=_run_merge)


def _run_merge(a: argparse.Namespace) -> int:
    from pathlib import Path

    from pie_lib.prune.shard import merge_shards
    from pie_lib.store import own_folder

    with own_folder(Path(a.out), what="pie merge", jsonl=("results.jsonl", "selections.jsonl")):  # one writer
        report = merge_shards(a.out, require_complete=True)
    print(
        f"merged {report.shards} shard(s): {report.rows} rows -> {a.out}/results.parquet and {a.out}/selections.jsonl"
    )
    return 0
