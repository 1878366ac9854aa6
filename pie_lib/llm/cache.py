"""A content-addressed disk cache of LLM answers: a rerun of the same requests costs nothing.

Key = SHA-256 of the canonical JSON of ``(model, messages, params)``; ``params`` holds every
sampling setting (temperature, max_tokens, seed). Nothing else goes in: not the base URL, never
the API key. One JSON file per entry, ``<dir>/<key[:2]>/<key>.json``, written atomically, so
concurrent workers and interrupted runs never leave a half-written entry.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from pie_lib.llm.base import ChatBackend, ChatResponse, Message
from pie_lib.store import write_text


def cache_key(model: str, messages: list[Message], params: dict[str, Any]) -> str:
    """SHA-256 hex digest of the canonical JSON of the request."""
    blob = json.dumps({"model": model, "messages": messages, "params": params}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class DiskCache:
    """Answers on disk under ``folder``, one JSON file per request hash."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)

    def path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict | None:
        p = self.path(key)
        try:
            return json.loads(p.read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError):
            return None  # a corrupt entry is treated as a miss and overwritten

    def put(self, key: str, record: dict) -> None:
        write_text(self.path(key), json.dumps(record, ensure_ascii=False))

    def __len__(self) -> int:
        return sum(1 for _ in self.folder.glob("*/*.json")) if self.folder.exists() else 0


class CachedChat:
    """A :class:`ChatBackend` that answers from ``cache`` when it can and fills it otherwise.

    Only successful answers are stored (failed requests raise and leave no entry). An answer
    that later fails to parse *is* stored: re-asking uses a different ``seed``, hence a new key.
    """

    def __init__(self, inner: ChatBackend, cache: DiskCache) -> None:
        self.inner = inner
        self.cache = cache
        self.kind = inner.kind
        self.model = inner.model

    def complete(
        self, messages: list[Message], *, temperature: float, max_tokens: int, seed: int | None = None
    ) -> ChatResponse:
        params = {"temperature": temperature, "max_tokens": max_tokens, "seed": seed}
        key = cache_key(self.model, messages, params)
        hit = self.cache.get(key)
        if hit is not None:
            r = hit["response"]
            return ChatResponse(r["text"], int(r["prompt_tokens"]), int(r["completion_tokens"]), cached=True)
        resp = self.inner.complete(messages, temperature=temperature, max_tokens=max_tokens, seed=seed)
        self.cache.put(
            key,
            {
                "model": self.model,
                "messages": messages,
                "params": params,
                "response": {
                    "text": resp.text,
                    "prompt_tokens": resp.prompt_tokens,
                    "completion_tokens": resp.completion_tokens,
                },
            },
        )
        return resp
