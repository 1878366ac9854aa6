"""Which LLM backend to use, and how (model, server, timeouts, retries, cache)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pie_lib.errors import LLMConfigError
from pie_lib.llm.base import BACKENDS, Backend, redact
from pie_lib.llm.retry import RetryPolicy

#: Environment variables read when a field is left unset (first one set wins).
ENV_MODEL = ("PIE_LLM_MODEL", "OPENAI_MODEL")
ENV_BASE_URL = ("PIE_LLM_BASE_URL", "OPENAI_BASE_URL")
ENV_API_KEY = ("PIE_LLM_API_KEY", "OPENAI_API_KEY")
ENV_CACHE = ("PIE_LLM_CACHE",)
DEFAULT_OPENAI_MODEL = "gpt-4o-mini"


def _env(names: tuple[str, ...]) -> str | None:
    for n in names:
        v = os.environ.get(n)
        if v:
            return v
    return None


@dataclass
class LLMConfig:
    """Settings of the explainer / generator / rater backend.

    Attributes:
        backend: "offline" (deterministic heuristic, no LLM), "openai" (any OpenAI-compatible
            chat-completions server) or "hf" (a local Hugging Face causal LM).
        model: model name (openai) or folder / hub id (hf). Default: ``PIE_LLM_MODEL`` /
            ``OPENAI_MODEL``, else ``gpt-4o-mini`` for openai.
        base_url: server URL, e.g. ``http://localhost:8000/v1`` for vLLM. Default:
            ``PIE_LLM_BASE_URL`` / ``OPENAI_BASE_URL``, else OpenAI's.
        api_key: default ``PIE_LLM_API_KEY`` / ``OPENAI_API_KEY``. Never logged, cached or written
            (excluded from ``repr`` and :meth:`public`).
        timeout_s: per-request timeout.
        retry: backoff for 429 / 5xx / timeouts / connection errors.
        cache_dir: disk cache of answers (None: no cache). Default ``PIE_LLM_CACHE`` if set.
        workers: concurrent requests (openai); hf and offline run one at a time.
        device, dtype: for the hf backend.
    """

    backend: Backend = "offline"
    model: str | None = None
    base_url: str | None = None
    api_key: str | None = field(default=None, repr=False)
    timeout_s: float = 60.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    cache_dir: str | Path | None = None
    workers: int = 4
    device: str | None = None
    dtype: str | None = None

    def resolved(self) -> "LLMConfig":
        """A copy with unset fields filled from the environment; raises on an unusable config."""
        if self.backend not in BACKENDS:
            raise LLMConfigError(f"unknown LLM backend {self.backend!r}; choose one of {', '.join(BACKENDS)}")
        c = LLMConfig(**{k: getattr(self, k) for k in self.__dataclass_fields__})
        c.model = c.model or _env(ENV_MODEL)
        c.cache_dir = c.cache_dir or _env(ENV_CACHE)
        if c.backend == "openai":
            c.model = c.model or DEFAULT_OPENAI_MODEL
            c.base_url = c.base_url or _env(ENV_BASE_URL)
            c.api_key = c.api_key or _env(ENV_API_KEY)
            if not c.api_key:
                if c.base_url:  # local servers (vLLM, Ollama, llama.cpp) accept any key
                    c.api_key = "not-needed"
                else:
                    raise LLMConfigError(
                        "the openai backend needs an API key: set PIE_LLM_API_KEY (or OPENAI_API_KEY), "
                        "or set PIE_LLM_BASE_URL to a local OpenAI-compatible server"
                    )
        elif c.backend == "hf":
            if not c.model:
                raise LLMConfigError(
                    "the hf backend needs a model: pass --llm-model (a local folder or hub id) or set PIE_LLM_MODEL"
                )
        else:
            c.model = "offline-heuristic"
        if c.backend != "openai":
            c.workers = 1
        return c

    def public(self) -> dict[str, Any]:
        """The settings safe to write into result files (no API key)."""
        base_url = redact(self.base_url, [self.api_key]) if self.base_url else None
        return {
            "backend": self.backend,
            "model": self.model,
            "base_url": base_url,
            "timeout_s": self.timeout_s,
            "max_retries": self.retry.max_retries,
        }
