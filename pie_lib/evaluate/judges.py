"""FADE's two LLM roles besides the explainer: the concept-text generator and the rater.

Both run on the same chat backends as the explainers (:func:`pie_lib.llm.make_chat`); under the
offline backend they are heuristics, not LLMs (:mod:`pie_lib.interpret.heuristics`). Unparseable
answers are re-asked with a new seed and then counted in ``parse_failures``; a sample that never
gets a valid rating is left unrated (-1) and out of every metric -- never scored as 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pie_lib.interpret import prompts as P
from pie_lib.llm import ChatBackend, Usage


@dataclass
class Judged:
    """What one role returned for one feature, and what it cost."""

    usage: Usage = field(default_factory=Usage)
    parse_failures: int = 0


@dataclass
class Generated(Judged):
    texts: list[str] = field(default_factory=list)


@dataclass
class Rated(Judged):
    ratings: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # -1 = unrated


class ConceptGenerator:
    """Asks for texts that express a description (FADE clarity)."""

    def __init__(
        self, chat: ChatBackend, temperature: float = 0.7, max_tokens: int = 800, parse_retries: int = 1
    ) -> None:
        self.chat, self.temperature, self.max_tokens, self.parse_retries = chat, temperature, max_tokens, parse_retries

    def generate(self, description: str, n_calls: int, n_per_call: int, keep: int | None = None) -> Generated:
        """``n_calls`` independent requests (seeds 0..n_calls-1) for ``n_per_call`` texts each;
        the unique texts, at most ``keep`` of them.

        Raises:
            LLMRequestError: the backend failed for good.
        """
        out = Generated()
        texts: list[str] = []
        messages = P.generator_messages(description, n_per_call)
        for call in range(n_calls):
            for attempt in range(self.parse_retries + 1):
                seed = call + 1000 * attempt  # distinct cache keys per sample and per re-ask
                resp = self.chat.complete(messages, temperature=self.temperature, max_tokens=self.max_tokens, seed=seed)
                out.usage = out.usage + resp.usage
                got = P.parse_generated(resp.text)
                if got is not None:
                    texts.extend(got)
                    break
                out.parse_failures += 1
            if keep is not None and len(dict.fromkeys(texts)) >= keep:
                break
        out.texts = list(dict.fromkeys(texts))[:keep] if keep is not None else list(dict.fromkeys(texts))
        return out


class Rater:
    """Rates texts 0 / 1 / 2 for a description, ``batch_size`` texts per request (FADE)."""

    def __init__(
        self,
        chat: ChatBackend,
        temperature: float = 0.0,
        max_tokens: int = 400,
        batch_size: int = 15,
        max_failed_retries: int = 1,
    ) -> None:
        self.chat, self.temperature, self.max_tokens = chat, temperature, max_tokens
        self.batch_size, self.max_failed_retries = batch_size, max_failed_retries

    def rate(self, description: str, texts: list[str]) -> Rated:
        """Ratings ``[len(texts)]`` (0, 1, 2, or -1 when never validly rated).

        Texts left unrated by a pass (unparseable answer, or IDs missing from it) are re-asked in
        up to ``max_failed_retries`` more passes.

        Raises:
            LLMRequestError: the backend failed for good.
        """
        out = Rated(ratings=np.full(len(texts), -1, dtype=np.int64))
        todo = list(range(len(texts)))
        for attempt in range(self.max_failed_retries + 1):
            if not todo:
                break
            for b in range(0, len(todo), self.batch_size):
                ids = todo[b : b + self.batch_size]
                messages = P.rater_messages(description, [(i, texts[i]) for i in ids])
                resp = self.chat.complete(
                    messages,
                    temperature=self.temperature,
                    max_tokens=self.max_tokens,
                    seed=attempt if attempt else None,
                )
                out.usage = out.usage + resp.usage
                got = P.parse_ratings(resp.text, ids)
                if got is None or len(got) < len(ids):
                    out.parse_failures += 1
                for i, r in (got or {}).items():
                    out.ratings[i] = r
            todo = [i for i in todo if out.ratings[i] < 0]
        return out
