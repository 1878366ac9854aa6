"""``pie interpret``: describe the features of pruned circuits (stage II).

The handler returns an exit code: 0 done, 1 done except for features whose LLM requests failed
(rerun to finish them); a ``PieError`` propagates to :func:`pie_lib.cli.app.main` (exit 2).
"""

from __future__ import annotations

import argparse
from typing import Any

from pie_lib.cli.args import add_llm_flags, add_world_flags, llm_config
from pie_lib.cli.fields import add_config_flags, config_from_args, flag
from pie_lib.errors import PieError
from pie_lib.interpret.corpus import CorpusConfig

#: the corpus fields ``pie interpret`` exposes, and their flags (type, default and help come from CorpusConfig)
CORPUS_FLAGS = {
    "source": flag("--corpus", dest="source"),
    "n_docs": "--n-docs",
    "ctx_len": "--ctx-len",
    "text_field": "--text-field",
    "split": "--split",
    "hf_config": "--hf-config",
}


def add_interpret_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``pie interpret``: describe the features of the selected circuits."""
    p = subparsers.add_parser(
        "interpret",
        help="describe the features of pruned circuits (stage II)",
        description="Union of kept (layer, feature) pairs of the selections -> activation examples over a corpus -> "
        "one description per feature (descriptions.parquet). Resumable: rerun to finish.",
    )
    p.add_argument("--selections", default=None, help="selections.jsonl written by `pie prune`")
    p.add_argument("--features", default=None, help="explicit features instead: 'layer:feature,layer:feature'")
    p.add_argument("--method", default=None, help="only selections of this method (e.g. fap-synergy)")
    p.add_argument("--k", type=int, default=None, help="only selections with this budget K")
    add_world_flags(p, "default: the toy world, llama")
    g = p.add_argument_group("corpus and examples")
    add_config_flags(g, CorpusConfig, CORPUS_FLAGS)
    g.add_argument("--batch-size", type=int, default=32, help="contexts per forward (default 32)")
    g.add_argument("--n-top", type=int, default=40, help="top examples kept per feature (default 40)")
    g.add_argument(
        "--examples-store",
        choices=["stream", "records"],
        default="stream",
        help="stream (default): per feature a running top list, reservoirs of its active contexts and its "
        "activation on a shared uniform sample of contexts; memory and disk bounded by the features explained, "
        "and what pie evaluate samples from. records: every nonzero activation on disk (grows with corpus x "
        "density; exact dense activations)",
    )
    g.add_argument(
        "--eval-top", type=int, default=None, help="stream: strongest contexts kept per feature for pie evaluate (256)"
    )
    g.add_argument(
        "--eval-reservoir",
        type=int,
        default=None,
        help="stream: uniform sample of each feature's active contexts for pie evaluate (1024)",
    )
    g.add_argument(
        "--context-sample",
        type=int,
        default=None,
        help="stream: uniform sample of all contexts with every feature's activation, for pie evaluate's "
        "non-activating / random draws and clarity; a corpus of at most this many contexts is held whole (4096)",
    )
    g.add_argument("--max-examples", type=int, default=40, help="examples in the explainer prompt (default 40)")
    g.add_argument("--max-features", type=int, default=None, help="explain only the first N features (smoke runs)")
    g.add_argument(
        "--examples",
        choices=("corpus", "store"),
        default="corpus",
        help="corpus: stream --corpus (default); store: read precomputed examples from a feature store "
        "(the reference's Stage II)",
    )
    g.add_argument(
        "--store",
        default=None,
        metavar="PATH_OR_HUB_ID",
        help="feature store: a local folder or hub id owner/name[@revision] holding features/index.json.gz "
        "(default: the toy world's store, or the --clt folder / hub id)",
    )
    add_llm_flags(p)
    p.add_argument("--out", default="pie_out/interpret", help="output folder (default pie_out/interpret)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run_interpret)
    return p


def _parse_features(spec: str) -> list[tuple[int, int]]:
    try:
        return [(int(a), int(b)) for a, b in (item.split(":") for item in spec.split(",") if item.strip())]
    except ValueError:
        raise PieError(f"--features {spec!r}: expected 'layer:feature,layer:feature'") from None


def run_interpret(args: argparse.Namespace) -> int:
    """Handler of ``pie interpret``."""
    from pie_lib.engine.remote import request_count
    from pie_lib.interpret.pipeline import InterpretConfig, interpret

    # PieErrors propagate to pie_lib.cli.main, which prints "pie interpret: error: ..." and exits 2
    cfg = InterpretConfig(max_features=args.max_features, corpus=config_from_args(CorpusConfig, args, CORPUS_FLAGS))
    cfg.examples.batch_size, cfg.examples.n_top = args.batch_size, args.n_top
    cfg.examples.store = args.examples_store
    stream_only = {"--eval-top": "eval_top", "--eval-reservoir": "eval_reservoir", "--context-sample": "context_sample"}
    given = [f for f, name in stream_only.items() if getattr(args, name) is not None]
    if given and args.examples_store != "stream":
        raise PieError(f"{', '.join(given)}: only for --examples-store stream; drop them or use the streaming store")
    for name in (n for f, n in stream_only.items() if f in given):
        setattr(cfg.examples, name, getattr(args, name))
    cfg.explain.max_examples = args.max_examples
    if args.selections is None and args.features is None:
        raise PieError("pie interpret needs --selections (from `pie prune`) or --features")
    before = request_count()
    from pathlib import Path

    from pie_lib.store import own_folder

    with own_folder(Path(args.out), what="pie interpret", jsonl=()):  # one writer per folder
        table = interpret(
            args.selections,
            features=_parse_features(args.features) if args.features else None,
            method=args.method,
            k=args.k,
            model=args.model,
            clt=args.clt,
            device=args.device,
            remote=bool(args.remote),
            model_backend=args.model_backend,
            corpus=None,
            llm=llm_config(args),
            out=args.out,
            config=cfg,
            progress=not args.no_progress,
            examples_source=args.examples,
            store=args.store,
        )
    counts = table["status"].value_counts().to_dict()
    print(
        f"{len(table)} features -> {args.out}/descriptions.parquet; status {counts}; "
        f"{int(table['calls'].sum())} calls, {int(table['prompt_tokens'].sum())} + "
        f"{int(table['completion_tokens'].sum())} tokens"
    )
    if args.remote:
        print(f"remote requests: {request_count() - before}")
    return 1 if counts.get("request_failed", 0) else 0
