"""Prompts and answer parsers for the three LLM roles: explainer, concept generator, rater.

Conventions (spec §7, §8; delphi / OpenAI neuron-explainer / FADE):

- explainer: examples with the strongly active tokens wrapped in ``<<tok>>`` (consecutive ones
  share one pair of markers), at most 40 examples, a meticulous-researcher system prompt, and an
  answer whose last ``[EXPLANATION]: ...`` line is the description;
- generator (FADE clarity): a JSON / Python list of texts expressing a concept;
- rater (FADE responsiveness / faithfulness): a JSON object ``{"<id>": 0|1|2}``.

Parsers return ``None`` for an answer that does not parse; callers re-ask and count failures.
Newlines inside texts are shown as the two characters ``\\n`` so one example is one line.
"""

from __future__ import annotations

import ast
import json
import re
from typing import Sequence

import numpy as np

from pie_lib.llm.base import Message

OPEN, CLOSE = "<<", ">>"

EXPLAINER_SYSTEM = (
    "You are a meticulous AI researcher studying what one internal feature of a language model "
    "responds to. You will be shown text excerpts from a corpus in which the feature is active. "
    "In each excerpt the tokens where the feature is most strongly active are wrapped in << and >>; "
    "a run of consecutive strongly active tokens shares one pair of markers.\n"
    "Find what the marked tokens have in common, taking their surrounding context into account.\n"
    "- Be concise: one short phrase or sentence, describing a single pattern, not a list of guesses.\n"
    "- Describe the pattern itself; do not mention the << >> markers or the word 'example'.\n"
    "- If the excerpts share little, describe the most frequent pattern.\n"
    "You may reason briefly first. The last line of your answer must be:\n"
    "[EXPLANATION]: <your description>"
)

GENERATOR_SYSTEM = (
    "You are building a collection of short texts that clearly express a given concept. "
    "Vary style, tone, context, length and structure, while keeping every text meaningfully tied "
    "to the concept (the concept need not be named outright).\n"
    "Answer with the texts as a JSON list of strings and nothing else, for example:\n"
    '["A first text.", "A second, somewhat longer text."]'
)

RATER_SYSTEM = (
    "You are building a collection of texts that express a given concept, and must rate how "
    "strongly each candidate text expresses it:\n"
    "0: the concept is not expressed.\n"
    "1: the concept is vaguely or partially expressed.\n"
    "2: the concept is clearly and unambiguously expressed.\n"
    "Rate conservatively: when unsure, choose the lower rating. Every text has an ID. "
    "Answer with a JSON object mapping each ID (as a string) to its rating and nothing else, for "
    'example: {"3": 0, "7": 2, "12": 1}'
)


def one_line(text: str) -> str:
    """Newlines as the two characters ``\\n`` (one example, one line)."""
    return text.replace("\r", "").replace("\n", "\\n")


def render_highlighted(text: str, starts: Sequence[int], ends: Sequence[int], mask: Sequence[bool] | np.ndarray) -> str:
    """``text`` with the tokens where ``mask`` is set wrapped in ``<<`` ``>>``.

    Args:
        text: the context's text.
        starts, ends: ``[T]`` character span of every token in ``text`` (special tokens: empty spans).
        mask: ``[T]`` which tokens to highlight; consecutive highlighted tokens share one pair.
    Returns:
        The marked-up text on one line.
    """
    out: list[str] = []
    cursor = prev_end = 0
    open_run = False
    for s, e, m in zip(starts, ends, mask):
        s, e = int(s), int(e)
        if e <= s:  # special token (BOS): no text
            continue
        if m and not open_run:
            out.append(text[cursor:s] + OPEN)
            cursor, open_run = s, True
        elif not m and open_run:
            out.append(text[cursor:prev_end] + CLOSE)
            cursor, open_run = prev_end, False
        prev_end = e
    if open_run:
        out.append(text[cursor:prev_end] + CLOSE)
        cursor = prev_end
    out.append(text[cursor:])
    return one_line("".join(out))


def highlight_mask(token_acts: np.ndarray, max_act: float, frac: float = 0.6) -> np.ndarray:
    """Tokens to highlight: ``|activation| > frac * |max_act|`` (spec §7: 0.6 x max)."""
    if max_act == 0:
        return np.zeros(token_acts.shape, dtype=bool)
    return np.abs(token_acts) > frac * abs(max_act)


def explainer_messages(examples: Sequence[str], max_examples: int = 40) -> list[Message]:
    """Chat messages asking for a description of ``examples`` (already marked up, one per line)."""
    body = "\n".join(f"Example {i + 1}: {ex}" for i, ex in enumerate(list(examples)[:max_examples]))
    user = (
        f"Excerpts where the feature is active:\n\n{body}\n\n"
        "What pattern do the marked tokens share? End with the line [EXPLANATION]: <description>"
    )
    return [{"role": "system", "content": EXPLAINER_SYSTEM}, {"role": "user", "content": user}]


_EXPL = re.compile(r"\[EXPLANATION\]\s*:\s*(.+)", re.IGNORECASE)


def parse_explanation(answer: str) -> str | None:
    """The text after the last ``[EXPLANATION]:`` (first line of it), or None if absent / empty."""
    hits = _EXPL.findall(answer or "")
    if not hits:
        return None
    desc = hits[-1].strip()
    if len(desc) >= 2 and desc[0] == desc[-1] == '"' and desc.count('"') == 2:
        desc = desc[1:-1].strip()  # the whole description quoted
    return desc or None


def generator_messages(description: str, n: int) -> list[Message]:
    """Ask for ``n`` texts expressing the concept ``description``."""
    user = f"Concept: {description}\nWrite {n} different texts expressing this concept."
    return [{"role": "system", "content": GENERATOR_SYSTEM}, {"role": "user", "content": user}]


def _literal(fragment: str) -> object:
    try:
        return json.loads(fragment)
    except (json.JSONDecodeError, ValueError):
        try:
            return ast.literal_eval(fragment)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            return None


def parse_generated(answer: str) -> list[str] | None:
    """The list of non-empty strings in the answer (JSON or Python literal), or None."""
    a, b = (answer or "").find("["), (answer or "").rfind("]")
    if a < 0 or b <= a:
        return None
    val = _literal(answer[a : b + 1])
    if not isinstance(val, list) or not all(isinstance(x, str) for x in val):
        return None
    texts = [x.strip() for x in val if x.strip()]
    return texts or None


def rater_messages(description: str, items: Sequence[tuple[int, str]]) -> list[Message]:
    """Ask for 0/1/2 ratings of ``items`` (id, text) against the concept ``description``."""
    lines = "\n".join(f"Text ID {i}: {one_line(t)!r}" for i, t in items)
    user = f"Concept: {description}\n\n{lines}"
    return [{"role": "system", "content": RATER_SYSTEM}, {"role": "user", "content": user}]


def parse_ratings(answer: str, ids: Sequence[int]) -> dict[int, int] | None:
    """Ratings for the requested ``ids`` found in the answer (values 0, 1 or 2 only).

    Returns:
        ``{id: rating}`` for the ids that were rated validly (possibly a subset), or None when the
        answer holds no JSON object at all.
    """
    a, b = (answer or "").find("{"), (answer or "").rfind("}")
    if a < 0 or b <= a:
        return None
    val = _literal(answer[a : b + 1])
    if not isinstance(val, dict):
        return None
    wanted = {str(i): i for i in ids}
    out: dict[int, int] = {}
    for k, v in val.items():
        key = str(k).strip()
        if key in wanted and isinstance(v, (int, float)) and not isinstance(v, bool) and v in (0, 1, 2):
            out[wanted[key]] = int(v)
    return out
