"""Explainers: activation examples in, a one-line description (and what it cost) out.

All explainers share one interface, :class:`Explainer`, and one implementation,
:class:`ChatExplainer`, over any chat backend (:func:`pie_lib.llm.make_chat`): an
OpenAI-compatible server, a local Hugging Face model, or the offline heuristic (not an LLM; see
:mod:`pie_lib.interpret.heuristics`). An answer without an ``[EXPLANATION]:`` line is re-asked
(with a new seed, so the cache does not replay it) up to ``parse_retries`` times and then counted
as a failure -- never turned into a description.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np

from pie_lib.errors import LLMRequestError
from pie_lib.interpret import prompts as P
from pie_lib.interpret.chat import make_chat
from pie_lib.interpret.examples import FeatureExamples
from pie_lib.llm import ChatBackend, LLMConfig, Usage

Status = Literal["ok", "parse_failed", "request_failed", "no_examples"]


@dataclass
class ExplainConfig:
    """How examples become a prompt, and how the explainer is asked.

    Attributes:
        max_examples: examples in the prompt (spec §7: up to 40), strongest first.
        highlight_frac: tokens with ``|act| > highlight_frac * max`` are wrapped in ``<<>>``.
        highlight_scope: "example" (max of each example; every example shows its peak) or
            "feature" (the feature's max over the corpus).
        include_quantile: also show quantile-sampled examples (after the top ones).
        temperature: spec §7: 0.2.
        max_tokens: answer budget.
        parse_retries: re-asks after an unparseable answer.
    """

    max_examples: int = 40
    highlight_frac: float = 0.6
    highlight_scope: Literal["example", "feature"] = "example"
    include_quantile: bool = False
    temperature: float = 0.2
    max_tokens: int = 400
    parse_retries: int = 2


@dataclass
class Explanation:
    """A description and its cost.

    Attributes:
        description: the parsed description, or None when there is none (see ``status``).
        status: "ok", "parse_failed" (every answer unparseable), "request_failed" (the backend
            failed for good; ``error`` says why, without secrets), "no_examples" (the feature never
            fired on the corpus; nothing was asked).
        usage: calls and tokens spent (cache hits included and counted in ``usage.cache_hits``).
        parse_failures: unparseable answers received.
    """

    layer: int
    feature: int
    description: str | None
    status: Status
    usage: Usage = field(default_factory=Usage)
    parse_failures: int = 0
    error: str | None = None
    n_examples: int = 0


class Explainer(Protocol):
    """Turns a feature's examples into an :class:`Explanation`."""

    backend: str
    model: str

    def explain(self, fx: FeatureExamples) -> Explanation: ...


class ChatExplainer:
    """The spec §7 explainer over any :class:`~pie_lib.llm.ChatBackend`."""

    def __init__(self, chat: ChatBackend, cfg: ExplainConfig | None = None) -> None:
        self.chat = chat
        self.cfg = cfg or ExplainConfig()
        self.backend = chat.kind
        self.model = chat.model

    def render(self, fx: FeatureExamples) -> list[str]:
        """The examples as marked-up lines (top first, then quantile ones if configured)."""
        cfg = self.cfg
        exs = [e for e in fx.examples if e.kind == "top" or cfg.include_quantile]
        exs = sorted(exs, key=lambda e: (e.kind != "top", -abs(e.act)))[: cfg.max_examples]
        lines = []
        for e in exs:
            ref = fx.max_act if cfg.highlight_scope == "feature" else float(e.token_acts[np.abs(e.token_acts).argmax()])
            mask = P.highlight_mask(e.token_acts, ref, cfg.highlight_frac)
            lines.append(P.render_highlighted(e.text, e.starts, e.ends, mask))
        return lines

    def explain(self, fx: FeatureExamples) -> Explanation:
        lines = self.render(fx)
        if not lines:
            return Explanation(fx.layer, fx.feature, None, "no_examples")
        messages = P.explainer_messages(lines, self.cfg.max_examples)
        usage, failures = Usage(), 0
        for attempt in range(self.cfg.parse_retries + 1):
            try:
                resp = self.chat.complete(
                    messages,
                    temperature=self.cfg.temperature,
                    max_tokens=self.cfg.max_tokens,
                    seed=attempt if attempt else None,
                )
            except LLMRequestError as exc:
                return Explanation(fx.layer, fx.feature, None, "request_failed", usage, failures, str(exc), len(lines))
            usage = usage + resp.usage
            desc = P.parse_explanation(resp.text)
            if desc is not None:
                return Explanation(fx.layer, fx.feature, desc, "ok", usage, failures, None, len(lines))
            failures += 1
        return Explanation(fx.layer, fx.feature, None, "parse_failed", usage, failures, None, len(lines))


def make_explainer(llm: LLMConfig | None = None, cfg: ExplainConfig | None = None) -> ChatExplainer:
    """The explainer for an LLM config (default: the offline heuristic)."""
    return ChatExplainer(make_chat(llm), cfg)
