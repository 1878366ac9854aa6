"""The offline backend: a deterministic heuristic that answers the three prompts. NOT an LLM.

It exists so that the toy world (and CI) runs Interpret and Evaluate end to end with no network
and no model download. It reads the prompts of :mod:`pie_lib.interpret.prompts` and answers in
the same formats an LLM would, so the parsing, retry and cost paths are the real ones:

- **explain**: counts the highlighted tokens and the word right before them; the description is
  ``tokens "A", "B", "C", mostly right after "w"; e.g. "... w A" | "... w B"``, i.e. the most
  frequent marked tokens, their most frequent left neighbour (when it precedes at least half of
  them) and two short contexts. It knows nothing about meaning.
- **generate**: re-uses the contexts quoted in a description, swapping in each listed token.
- **rate**: 2 if a text contains a listed token (right after the listed left neighbour, when
  there is one), 1 if it contains a listed token elsewhere, 0 otherwise.

Token counts reported for it are counts of regex word pieces (``\\w+`` or one punctuation mark),
not of any LLM tokenizer; they let the cost machinery run offline and are labelled as offline.
Descriptions written by a real LLM are handled too, crudely: quoted strings, else content
words, are taken as the concept's tokens.
"""

from __future__ import annotations

import ast
import json
import re
from collections import Counter

from pie_lib.interpret import prompts as P
from pie_lib.llm.base import ChatResponse, Message

_PIECE = re.compile(r"\w+|[^\w\s]")
_STOP = {
    "the",
    "a",
    "an",
    "and",
    "or",
    "of",
    "to",
    "in",
    "on",
    "for",
    "with",
    "token",
    "tokens",
    "word",
    "words",
    "mostly",
    "right",
    "after",
    "before",
    "text",
    "texts",
    "this",
    "that",
    "which",
    "feature",
    "fires",
    "activates",
    "context",
    "contexts",
    "e",
    "g",
    "such",
    "as",
    "like",
    "is",
    "are",
    "its",
    "it",
}


def count_pieces(text: str) -> int:
    """Regex word-piece count, the offline backend's stand-in for a token count."""
    return len(_PIECE.findall(text))


def _quoted(s: str) -> list[str]:
    return [m for m in re.findall(r'"([^"]+)"', s)]


def parse_concept(description: str) -> tuple[list[str], str | None, list[str]]:
    """(tokens, left neighbour or None, example contexts) from a description.

    Understands the offline explainer's format exactly; for other descriptions: quoted strings,
    else content words, are the tokens.
    """
    d = description.strip()
    m = re.match(r'tokens? ((?:"[^"]+"(?:, | and )?)+)', d)
    if m:
        tokens = _quoted(m.group(1))
        ctx = re.search(r'right after "([^"]+)"', d)
        eg = d.split("e.g.", 1)
        snippets = _quoted(eg[1]) if len(eg) == 2 else []
        return tokens, (ctx.group(1) if ctx else None), snippets
    tokens = _quoted(d)
    if not tokens:
        tokens = [w for w in re.findall(r"[A-Za-z_][\w']+", d) if w.lower() not in _STOP][:5]
    return tokens, None, []


def _contains(text: str, token: str) -> list[int]:
    """Start offsets of ``token`` in ``text`` (whole-word matches for word tokens)."""
    tok = token.strip()
    if not tok:
        return []
    pat = rf"(?<!\w){re.escape(tok)}(?!\w)" if re.fullmatch(r"\w+", tok) else re.escape(tok)
    return [m.start() for m in re.finditer(pat, text)]


def rate_text(text: str, tokens: list[str], left: str | None) -> int:
    """The offline rater's rule (see module docstring)."""
    best = 0
    for tok in tokens:
        for start in _contains(text, tok):
            before = _PIECE.findall(text[:start])
            if left is None or (before and before[-1] == left):
                return 2
            best = 1
    return best


class OfflineChat:
    """Answers explainer / generator / rater prompts heuristically (module docstring)."""

    kind = "offline"
    model = "offline-heuristic"

    def complete(
        self, messages: list[Message], *, temperature: float = 0.0, max_tokens: int = 0, seed: int | None = None
    ) -> ChatResponse:
        system = messages[0]["content"] if messages and messages[0]["role"] == "system" else ""
        user = messages[-1]["content"] if messages else ""
        if system == P.EXPLAINER_SYSTEM:
            text = self._explain(user)
        elif system == P.GENERATOR_SYSTEM:
            text = self._generate(user, seed or 0)
        elif system == P.RATER_SYSTEM:
            text = self._rate(user)
        else:
            text = "The offline heuristic only answers pie_lib's own explainer, generator and rater prompts."
        prompt = sum(count_pieces(m["content"]) for m in messages)
        return ChatResponse(text=text, prompt_tokens=prompt, completion_tokens=count_pieces(text))

    # ------------------------------------------------------------------ explain
    @staticmethod
    def _explain(user: str) -> str:
        marked: Counter[str] = Counter()
        left: Counter[str] = Counter()
        first_seen: dict[str, int] = {}
        snippets: list[str] = []
        for line in re.findall(r"^Example \d+: (.*)$", user, flags=re.M):
            for m in re.finditer(re.escape(P.OPEN) + r"(.+?)" + re.escape(P.CLOSE), line):
                tok = m.group(1).replace("\\n", " ").strip()
                if not tok:
                    continue
                marked[tok] += 1
                first_seen.setdefault(tok, len(first_seen))
                before = _PIECE.findall(line[: m.start()].replace(P.OPEN, "").replace(P.CLOSE, "").replace("\\n", " "))
                if before:
                    left[before[-1]] += 1
                if len(snippets) < 2 and '"' not in tok:
                    ctx = " ".join(w for w in before[-5:] if '"' not in w)
                    snippets.append(f"{ctx} {tok}".strip())
        if not marked:
            return "Nothing is marked in these excerpts.\n[EXPLANATION]:"  # unparseable on purpose
        top = sorted(marked, key=lambda t: (-marked[t], first_seen[t]))[:3]
        top = [t for t in top if '"' not in t] or ["?"]
        words = ", ".join(f'"{t}"' for t in top)
        desc = f"token {words}" if len(top) == 1 else f"tokens {words}"
        if left:
            w, c = left.most_common(1)[0]
            if c >= 0.5 * sum(marked.values()) and '"' not in w:
                desc += f', mostly right after "{w}"'
        if snippets:
            desc += "; e.g. " + " | ".join(f'"{s}"' for s in dict.fromkeys(snippets))
        n = sum(marked.values())
        return f"Counted {n} marked tokens in {len(first_seen)} distinct forms.\n[EXPLANATION]: {desc}"

    # ------------------------------------------------------------------ generate
    @staticmethod
    def _generate(user: str, seed: int) -> str:
        concept = re.search(r"^Concept: (.*)$", user, flags=re.M)
        n_m = re.search(r"Write (\d+) ", user)
        n = int(n_m.group(1)) if n_m else 5
        tokens, left, snippets = parse_concept(concept.group(1) if concept else "")
        if not tokens:
            return "[]"
        texts: list[str] = []
        for i in range(n):
            tok = tokens[(i + seed) % len(tokens)]
            if snippets:
                snip = snippets[(i + seed) % len(snippets)]
                base = next((snip[: -len(t)] for t in tokens if snip.endswith(t)), snip + " ")
                texts.append(f"{base}{tok}")
            else:
                texts.append(f"{left} {tok}" if left else tok)
        return json.dumps(list(dict.fromkeys(texts)))

    # ------------------------------------------------------------------ rate
    @staticmethod
    def _rate(user: str) -> str:
        concept = re.search(r"^Concept: (.*)$", user, flags=re.M)
        tokens, left, _ = parse_concept(concept.group(1) if concept else "")
        ratings: dict[str, int] = {}
        for i, lit in re.findall(r"^Text ID (\d+): (.*)$", user, flags=re.M):
            try:
                text = ast.literal_eval(lit)
            except (ValueError, SyntaxError):
                text = lit
            ratings[i] = rate_text(str(text).replace("\\n", "\n"), tokens, left)
        return json.dumps(ratings)
