"""The chat interface every explainer / generator / rater talks to, and what a call costs.

A :class:`ChatBackend` turns chat messages into one answer. Three implementations exist:
``openai`` (any OpenAI-compatible server: OpenAI, vLLM, Ollama, llama.cpp), ``hf`` (a local
Hugging Face causal LM) and ``offline`` (a deterministic heuristic, not an LLM; see
:mod:`pie_lib.interpret.heuristics`). :class:`~pie_lib.llm.cache.CachedChat` wraps any of them
with a content-addressed disk cache.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal, Protocol, runtime_checkable

Backend = Literal["offline", "openai", "hf"]
BACKENDS: tuple[str, ...] = ("offline", "openai", "hf")

Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": ...}


@dataclass
class Usage:
    """What some LLM work cost, from the counts the backend reported.

    Attributes:
        calls: answers used (served by the backend or from the cache).
        prompt_tokens, completion_tokens: as reported by the backend for those answers (a cache hit
            reports the counts of the request that filled it, so a feature's cost does not depend
            on whether this run paid for it).
        cache_hits: how many of ``calls`` were served from the disk cache (cost nothing this run).
    """

    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cache_hits: int = 0

    def __add__(self, other: "Usage") -> "Usage":
        return Usage(
            self.calls + other.calls,
            self.prompt_tokens + other.prompt_tokens,
            self.completion_tokens + other.completion_tokens,
            self.cache_hits + other.cache_hits,
        )

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass
class ChatResponse:
    """One answer. ``cached`` is True when it came from the disk cache."""

    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached: bool = False

    @property
    def usage(self) -> Usage:
        return Usage(1, self.prompt_tokens, self.completion_tokens, int(self.cached))


@runtime_checkable
class ChatBackend(Protocol):
    """Anything that answers chat messages.

    Attributes:
        kind: "openai", "hf" or "offline".
        model: the model name (part of the cache key).
    """

    kind: str
    model: str

    def complete(
        self, messages: list[Message], *, temperature: float, max_tokens: int, seed: int | None = None
    ) -> ChatResponse:
        """One answer to ``messages``. ``seed`` distinguishes repeated samples of the same request.

        Raises:
            LLMRequestError: the request failed for good (after the backend's retries).
        """
        ...


def redact(text: str, secrets: list[str | None]) -> str:
    """``text`` with every secret (API keys) replaced by a placeholder; secrets shorter than 4
    characters are ignored (they would mangle ordinary text and are not real keys)."""
    for s in secrets:
        if s and len(s) >= 4 and s in text:
            text = text.replace(s, "<redacted>")
    return text
