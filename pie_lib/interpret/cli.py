"""``pie interpret`` and ``pie evaluate``: argparse parsers whose flags map onto the configs.

The lead's ``pie`` entry point calls :func:`add_interpret_parser` and :func:`add_evaluate_parser`
on its subparsers; each sets ``func`` to a handler that takes the parsed args and returns an exit
code: 0 done, 1 done except for features whose LLM requests failed (rerun to finish them),
2 a user error (message on stderr).
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from pie_lib.errors import PieError
from pie_lib.llm import BACKENDS, LLMConfig, RetryPolicy

log = logging.getLogger("pie_lib.interpret")


def _add_llm_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("LLM backend (API key: env PIE_LLM_API_KEY or OPENAI_API_KEY, never a flag)")
    g.add_argument("--backend", choices=BACKENDS, default="offline",
                   help="offline = deterministic heuristic, not an LLM (default); openai = any OpenAI-compatible "
                        "server (OpenAI, vLLM, Ollama, llama.cpp); hf = local Hugging Face model")
    g.add_argument("--llm-model", default=None, help="model name (openai) or folder / hub id (hf); env PIE_LLM_MODEL")
    g.add_argument("--base-url", default=None, help="server URL, e.g. http://localhost:8000/v1; env PIE_LLM_BASE_URL")
    g.add_argument("--timeout", type=float, default=60.0, help="seconds per request (default 60)")
    g.add_argument("--max-retries", type=int, default=5, help="retries on 429 / 5xx / timeouts (default 5)")
    g.add_argument("--workers", type=int, default=4, help="concurrent requests, openai backend (default 4)")
    g.add_argument("--cache-dir", default=None, help="LLM answer cache (default <out>/llm_cache; env PIE_LLM_CACHE)")


def _add_world_flags(p: argparse.ArgumentParser, defaults_note: str) -> None:
    g = p.add_argument_group(f"model and CLT ({defaults_note})")
    g.add_argument("--model", default=None, help="model folder or hub id")
    g.add_argument("--clt", default=None, help="CLT folder or hub id")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    g.add_argument("--remote", action="store_true", default=None, help="run every nnsight trace remotely (NDIF)")


def _llm_config(args: argparse.Namespace) -> LLMConfig:
    return LLMConfig(backend=args.backend, model=args.llm_model, base_url=args.base_url, timeout_s=args.timeout,
                     retry=RetryPolicy(max_retries=args.max_retries), cache_dir=args.cache_dir, workers=args.workers)


def add_interpret_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``pie interpret``: describe the features of the selected circuits."""
    p = subparsers.add_parser(
        "interpret", help="describe the features of pruned circuits (stage II)",
        description="Union of kept (layer, feature) pairs of the selections -> activation examples over a corpus -> "
                    "one description per feature (descriptions.parquet). Resumable: rerun to finish.",
    )
    p.add_argument("--selections", default=None, help="selections.jsonl written by `pie prune`")
    p.add_argument("--features", default=None, help="explicit features instead: 'layer:feature,layer:feature'")
    p.add_argument("--method", default=None, help="only selections of this method (e.g. fap-synergy)")
    p.add_argument("--k", type=int, default=None, help="only selections with this budget K")
    _add_world_flags(p, "default: the toy world, llama")
    g = p.add_argument_group("corpus and examples")
    g.add_argument("--corpus", default="toy", help="toy (default), a .txt (one doc per line) / .jsonl file, or a HF dataset name")
    g.add_argument("--n-docs", type=int, default=2000, help="documents read from the corpus (default 2000)")
    g.add_argument("--ctx-len", type=int, default=64, help="tokens per context (default 64)")
    g.add_argument("--text-field", default="text", help="text field of .jsonl / HF rows (default text)")
    g.add_argument("--split", default="train", help="HF dataset split (default train)")
    g.add_argument("--hf-config", default=None, help="HF dataset config name")
    g.add_argument("--batch-size", type=int, default=32, help="contexts per forward (default 32)")
    g.add_argument("--n-top", type=int, default=40, help="top examples kept per feature (default 40)")
    g.add_argument("--max-examples", type=int, default=40, help="examples in the explainer prompt (default 40)")
    g.add_argument("--max-features", type=int, default=None, help="explain only the first N features (smoke runs)")
    _add_llm_flags(p)
    p.add_argument("--out", default="pie_out/interpret", help="output folder (default pie_out/interpret)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run_interpret)
    return p


def add_evaluate_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``pie evaluate``: FADE scores of the descriptions."""
    p = subparsers.add_parser(
        "evaluate", help="score descriptions with FADE metrics (stage III)",
        description="Clarity, Responsiveness, Purity, Faithfulness of every description (fade_<protocol>.parquet). "
                    "Resumable: rerun to finish.",
    )
    p.add_argument("--descriptions", required=True, help="descriptions.parquet written by `pie interpret`")
    p.add_argument("--protocol", choices=("pie", "fade"), default="pie",
                   help="pie: 10 top + 10 random rated, 5 generated texts (default); fade: ~500 rated, 15 generations")
    _add_world_flags(p, "default: those recorded by `pie interpret`")
    p.add_argument("--max-features", type=int, default=None, help="evaluate only the first N features")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    _add_llm_flags(p)
    p.add_argument("--out", default=None, help="output folder (default: the descriptions' folder)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run_evaluate)
    return p


def _parse_features(spec: str) -> list[tuple[int, int]]:
    try:
        return [(int(a), int(b)) for a, b in (item.split(":") for item in spec.split(",") if item.strip())]
    except ValueError:
        raise PieError(f"--features {spec!r}: expected 'layer:feature,layer:feature'") from None


def run_interpret(args: argparse.Namespace) -> int:
    """Handler of ``pie interpret``."""
    from pie_lib.interpret.pipeline import InterpretConfig, interpret

    # PieErrors propagate to pie_lib.cli.main, which prints "pie interpret: error: ..." and exits 2
    cfg = InterpretConfig(max_features=args.max_features)
    cfg.corpus.source, cfg.corpus.n_docs, cfg.corpus.ctx_len = args.corpus, args.n_docs, args.ctx_len
    cfg.corpus.text_field, cfg.corpus.split, cfg.corpus.hf_config = args.text_field, args.split, args.hf_config
    cfg.examples.batch_size, cfg.examples.n_top = args.batch_size, args.n_top
    cfg.explain.max_examples = args.max_examples
    if args.selections is None and args.features is None:
        raise PieError("pie interpret needs --selections (from `pie prune`) or --features")
    table = interpret(
        args.selections, features=_parse_features(args.features) if args.features else None,
        method=args.method, k=args.k, model=args.model, clt=args.clt, device=args.device,
        remote=bool(args.remote), corpus=None, llm=_llm_config(args), out=args.out, config=cfg,
        progress=not args.no_progress,
    )
    counts = table["status"].value_counts().to_dict()
    print(f"{len(table)} features -> {args.out}/descriptions.parquet; status {counts}; "
          f"{int(table['calls'].sum())} calls, {int(table['prompt_tokens'].sum())} + "
          f"{int(table['completion_tokens'].sum())} tokens")
    return 1 if counts.get("request_failed", 0) else 0


def run_evaluate(args: argparse.Namespace) -> int:
    """Handler of ``pie evaluate``."""
    from pie_lib.fade.protocol import ProtocolConfig, evaluate

    pc = ProtocolConfig.named(args.protocol)
    pc.seed = args.seed
    table = evaluate(
        args.descriptions, protocol=pc, llm=_llm_config(args), model=args.model, clt=args.clt, device=args.device,
        remote=args.remote, out=args.out, max_features=args.max_features, progress=not args.no_progress,
    )
    means = table[["clarity", "responsiveness", "purity", "faithfulness"]].mean(numeric_only=True).round(3).to_dict()
    print(f"{len(table)} features scored ({args.protocol}); means {means}; status {table['status'].value_counts().to_dict()}")
    return 1 if (table["status"] == "request_failed").any() else 0
