"""Shared pieces of the ``pie`` commands: comma-list flag types, the LLM and model/CLT option groups."""

from __future__ import annotations

import argparse

from pie_lib.llm import BACKENDS, LLMConfig, RetryPolicy


def ints(s: str) -> list[int]:
    try:
        return [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None


def floats(s: str) -> list[float]:
    try:
        return [float(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}") from None


def names(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def add_llm_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("LLM backend (API key: env PIE_LLM_API_KEY or OPENAI_API_KEY, never a flag)")
    g.add_argument(
        "--backend",
        choices=BACKENDS,
        default="offline",
        help="offline = deterministic heuristic, not an LLM (default); openai = any OpenAI-compatible "
        "server (OpenAI, vLLM, Ollama, llama.cpp); hf = local Hugging Face model",
    )
    g.add_argument("--llm-model", default=None, help="model name (openai) or folder / hub id (hf); env PIE_LLM_MODEL")
    g.add_argument("--base-url", default=None, help="server URL, e.g. http://localhost:8000/v1; env PIE_LLM_BASE_URL")
    g.add_argument("--timeout", type=float, default=60.0, help="seconds per request (default 60)")
    g.add_argument("--max-retries", type=int, default=5, help="retries on 429 / 5xx / timeouts (default 5)")
    g.add_argument("--workers", type=int, default=4, help="concurrent requests, openai backend (default 4)")
    g.add_argument("--cache-dir", default=None, help="LLM answer cache (default <out>/llm_cache; env PIE_LLM_CACHE)")


def add_world_flags(p: argparse.ArgumentParser, defaults_note: str) -> None:
    g = p.add_argument_group(f"model and CLT ({defaults_note})")
    g.add_argument("--model", default=None, help="model folder or hub id")
    g.add_argument("--clt", default=None, help="CLT folder or hub id")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    g.add_argument("--remote", action="store_true", default=None, help="run every nnsight trace remotely (NDIF)")
    g.add_argument(
        "--model-backend",
        choices=("auto", "native", "hf"),
        default="auto",
        help="model code: native (pie_lib's own GPT-2 / Llama / Gemma-2), hf (transformers), auto (native for a local "
        "GPT-2 / Llama / Gemma-2 folder run here, hf otherwise; default)",
    )


def llm_config(args: argparse.Namespace) -> LLMConfig:
    return LLMConfig(
        backend=args.backend,
        model=args.llm_model,
        base_url=args.base_url,
        timeout_s=args.timeout,
        retry=RetryPolicy(max_retries=args.max_retries),
        cache_dir=args.cache_dir,
        workers=args.workers,
    )
