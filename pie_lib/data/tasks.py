"""Clean/corrupted pair generators for IOI and Doc-String, for any Hugging Face tokenizer.

Both generators follow the same rules (spec §1):

- a name / argument is usable only if ``" " + word`` tokenises (no special tokens) to exactly one
  token that is not the unknown token; unusable ones are dropped and counted;
- a pair is kept only if its clean and corrupted prompts have the same token length (checked with
  the tokenizer), otherwise it is dropped, counted, and another one is drawn;
- ``io_clean`` is the correct next token with a leading space, ``s_clean`` the wrong one.

The word lists and templates below are the ones the embedded toy world (:mod:`pie_lib.toy`) is
trained on, so toy corpus and generators agree. The toy world holds some of them out of training
(:data:`IOI_HELDOUT_TEMPLATES`, :func:`is_heldout_names`, :func:`is_heldout_args`); the generators
themselves never filter unless given ``pair_filter``.

**IOI.** A template is a string with three name slots ``{A} {B} {C}`` (and ``{PLACE}``,
``{OBJECT}``); ``{C}`` is the second mention of the subject. ABBA order: A=IO, B=S, C=S; BABA
order: A=S, B=IO, C=S. Corruptions: ``"abc"`` puts three fresh distinct names (none equal to IO
or S) in the three slots; ``"s2_io"`` replaces the second S by IO, which flips the answer.

**Doc-String.** ``def fn(a, b, c):`` followed by a docstring whose ``:param`` lines document the
first ``n_documented`` arguments in order, ending with an open ``:param``; the answer is the next
argument. The corrupted prompt keeps the docstring but replaces the def's argument names by other
random arguments (distinct, none among the clean ones). ``s_clean`` is **the corrupted prompt's
answer**: the replacement argument at the target position.
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Sequence

from pie_lib.data.pairs import Pair
from pie_lib.errors import DataFormatError

# --------------------------------------------------------------------------- word lists
#: Common first names (chosen to be single tokens with a leading space in common BPE vocabularies).
NAMES: tuple[str, ...] = (
    "Mary",
    "John",
    "Tom",
    "James",
    "David",
    "Sarah",
    "Paul",
    "Mark",
    "Lisa",
    "Anna",
    "Michael",
    "Robert",
    "Daniel",
    "Laura",
    "Kevin",
    "Emma",
    "Alice",
    "Peter",
    "Jack",
    "Kate",
    "Steven",
    "Rachel",
    "Brian",
    "Jessica",
    "Andrew",
    "Susan",
    "Eric",
    "Linda",
    "Adam",
    "Helen",
    "George",
    "Amy",
    "Frank",
    "Grace",
    "Henry",
    "Karen",
    "Jason",
    "Rose",
    "Simon",
    "Julia",
)
PLACES: tuple[str, ...] = (
    "store",
    "park",
    "school",
    "station",
    "garden",
    "office",
    "market",
    "beach",
    "library",
    "hospital",
    "restaurant",
    "house",
)
OBJECTS: tuple[str, ...] = (
    "drink",
    "book",
    "ring",
    "bone",
    "kiss",
    "basketball",
    "computer",
    "necklace",
    "letter",
    "snack",
    "bag",
    "key",
)

_PREFIXES: tuple[str, ...] = (
    "When {A} and {B} went to the {PLACE},",
    "After {A} and {B} arrived at the {PLACE},",
    "Then, {A} and {B} were working at the {PLACE}.",
    "While {A} and {B} were walking to the {PLACE},",
    "Once {A} and {B} got to the {PLACE},",
    "Yesterday {A} and {B} had lunch at the {PLACE}.",
)
_ACTIONS: tuple[str, ...] = (
    "{C} gave a {OBJECT} to",
    "{C} handed the {OBJECT} to",
    "{C} passed a {OBJECT} to",
    "{C} threw the {OBJECT} to",
    "{C} sold the {OBJECT} to",
    "{C} showed the {OBJECT} to",
)
#: All IOI templates: every prefix clause combined with every action clause (36).
IOI_TEMPLATES: tuple[str, ...] = tuple(f"{p} {a}" for p in _PREFIXES for a in _ACTIONS)
#: Templates the toy world never trains on (one per prefix and one per action clause; 6).
IOI_HELDOUT_TEMPLATES: tuple[str, ...] = tuple(
    f"{_PREFIXES[i]} {_ACTIONS[(i + 2) % len(_ACTIONS)]}" for i in range(len(_PREFIXES))
)
#: Templates the toy world trains on (30).
IOI_TRAIN_TEMPLATES: tuple[str, ...] = tuple(t for t in IOI_TEMPLATES if t not in IOI_HELDOUT_TEMPLATES)

#: Argument names for Doc-String functions.
ARGS: tuple[str, ...] = (
    "data",
    "path",
    "size",
    "name",
    "value",
    "key",
    "mode",
    "file",
    "user",
    "count",
    "text",
    "index",
    "item",
    "node",
    "port",
    "line",
    "level",
    "color",
    "width",
    "height",
    "token",
    "model",
    "state",
    "event",
    "query",
    "table",
    "field",
    "limit",
    "offset",
    "target",
    "source",
    "config",
    "result",
    "label",
    "scale",
    "shape",
    "order",
    "group",
    "weight",
    "length",
)
#: Function names for Doc-String functions.
FUNCTION_NAMES: tuple[str, ...] = (
    "load",
    "save",
    "run",
    "get",
    "read",
    "write",
    "build",
    "parse",
    "update",
    "check",
    "send",
    "open",
    "find",
    "create",
    "start",
    "process",
    "render",
    "compute",
    "apply",
    "merge",
)
#: Words used for docstring descriptions.
DESCRIPTION_WORDS: tuple[str, ...] = (
    "the",
    "a",
    "new",
    "old",
    "first",
    "last",
    "current",
    "default",
    "maximum",
    "minimum",
    "number",
    "list",
    "string",
    "value",
    "object",
    "input",
    "output",
    "file",
    "record",
    "entry",
    "of",
    "for",
    "to",
    "in",
    "from",
    "with",
)

DOCSTRING_HEADER = 'def {fn}({args}):\n    """{desc}\n\n'
DOCSTRING_PARAM = "    :param {arg}: {desc}\n"
DOCSTRING_OPEN = "    :param"

PromptCorruption = Literal["abc", "s2_io"]
Task = Literal["ioi", "docstring"]


# --------------------------------------------------------------------------- held-out splits
def _bucket(*words: str) -> int:
    """A process-independent hash bucket in [0, 5) (Python's ``hash`` is salted per process)."""
    return zlib.crc32("|".join(words).encode()) % 5


def is_heldout_names(a: str, b: str) -> bool:
    """True for the ~20% of unordered name pairs the toy world never trains on as (IO, S)."""
    return _bucket(*sorted((a, b))) == 0


def is_heldout_args(prev: str, nxt: str) -> bool:
    """True for the ~20% of ordered (argument, next argument) bigrams never adjacent in training defs."""
    return _bucket(prev, nxt) == 0


# --------------------------------------------------------------------------- helpers
@dataclass
class TaskPairs:
    """Generated pairs and what was dropped on the way.

    Attributes:
        pairs: the pairs, each with ``meta`` describing how it was built.
        dropped: counts, e.g. ``{"multi_token_names": 2, "unk_names": 0, "length_mismatch": 1}``.
    """

    pairs: list[Pair]
    dropped: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.pairs)

    def __iter__(self):
        return iter(self.pairs)


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def single_token_words(tokenizer: Any, words: Sequence[str]) -> tuple[list[str], int, int]:
    """Split ``words`` into those whose ``" " + word`` is one (known) token.

    Returns:
        (usable words in input order, number of multi-token words, number mapped to the unknown token).
    """
    unk = getattr(tokenizer, "unk_token_id", None)
    usable, multi, unknown = [], 0, 0
    for w in dict.fromkeys(words):  # de-duplicate, keep order
        ids = _ids(tokenizer, " " + w)
        if len(ids) != 1:
            multi += 1
        elif unk is not None and ids[0] == unk:
            unknown += 1
        else:
            usable.append(w)
    return usable, multi, unknown


def _check_template(template: str) -> None:
    for slot in ("{A}", "{B}", "{C}"):
        i = template.find(slot)
        if i < 0:
            raise DataFormatError(
                f"IOI template {template!r} lacks the name slot {slot}; it needs {{A}}, {{B}} and {{C}}"
            )
        if i == 0 or template[i - 1] != " ":
            # A name must be preceded by a space so that its token is the " Name" token we checked.
            raise DataFormatError(f"IOI template {template!r}: the slot {slot} must follow a space")


def _fill(template: str, a: str, b: str, c: str, place: str, obj: str) -> str:
    return template.format(A=a, B=b, C=c, PLACE=place, OBJECT=obj)


def _generate(
    n: int,
    seed: int,
    draw: Callable[[random.Random], tuple[str, str, str, str, dict] | None],
    tokenizer: Any,
    dropped: dict[str, int],
    what: str,
) -> list[Pair]:
    """Draw pairs until ``n`` have equal clean/corrupted token lengths (bounded number of tries)."""
    rng = random.Random(seed)
    pairs: list[Pair] = []
    tries = 0
    while len(pairs) < n:
        tries += 1
        if tries > 50 * n + 100:
            raise DataFormatError(
                f"{what}: only {len(pairs)} of {n} pairs could be built in {tries - 1} draws "
                f"(dropped: {dropped}); loosen pair_filter or pass more names / templates"
            )
        drawn = draw(rng)
        if drawn is None:  # rejected by a pair filter
            continue
        clean, corr, io, s, meta = drawn
        if len(_ids(tokenizer, clean)) != len(_ids(tokenizer, corr)):
            dropped["length_mismatch"] += 1
            continue
        pairs.append(Pair(clean, corr, " " + io, " " + s, meta=meta))
    return pairs


# --------------------------------------------------------------------------- IOI
def ioi_pairs(
    tokenizer: Any,
    n: int,
    seed: int = 0,
    names: Sequence[str] | None = None,
    templates: Sequence[str] | None = None,
    corruption: PromptCorruption = "abc",
    places: Sequence[str] | None = None,
    objects: Sequence[str] | None = None,
    pair_filter: Callable[[str, str], bool] | None = None,
) -> TaskPairs:
    """Indirect-object-identification pairs, half ABBA and half BABA (drawn at random).

    Args:
        tokenizer: any Hugging Face tokenizer (callable, returning ``input_ids``).
        n: number of pairs to return.
        seed: same seed, same pairs.
        names: candidate names (default :data:`NAMES`); multi-token / unknown ones are dropped.
        templates: templates with slots ``{A} {B} {C} {PLACE} {OBJECT}`` (default :data:`IOI_TEMPLATES`).
        corruption: ``"abc"`` (three fresh names) or ``"s2_io"`` (second S replaced by IO).
        places, objects: fillers for ``{PLACE}`` / ``{OBJECT}``.
        pair_filter: optional predicate ``(io, s) -> bool``; pairs it rejects are redrawn (not counted).
    Returns:
        :class:`TaskPairs` with ``dropped`` keys ``multi_token_names``, ``unk_names``, ``length_mismatch``.
    """
    if corruption not in ("abc", "s2_io"):
        raise ValueError(f"corruption must be 'abc' or 's2_io', not {corruption!r}")
    templates = list(templates or IOI_TEMPLATES)
    for t in templates:
        _check_template(t)
    places, objects = list(places or PLACES), list(objects or OBJECTS)
    usable, multi, unknown = single_token_words(tokenizer, names or NAMES)
    dropped = {"multi_token_names": multi, "unk_names": unknown, "length_mismatch": 0}
    need = 5 if corruption == "abc" else 2
    if len(usable) < need:
        raise DataFormatError(
            f"ioi_pairs: only {len(usable)} names are single tokens for this tokenizer "
            f"(dropped {dropped}); corruption={corruption!r} needs at least {need}"
        )

    def draw(rng: random.Random) -> tuple[str, str, str, str, dict] | None:
        ti = rng.randrange(len(templates))
        io, s = rng.sample(usable, 2)
        order = rng.choice(("ABBA", "BABA"))
        place, obj = rng.choice(places), rng.choice(objects)
        if pair_filter is not None and not pair_filter(io, s):
            return None
        a, b = (io, s) if order == "ABBA" else (s, io)
        clean = _fill(templates[ti], a, b, s, place, obj)
        if corruption == "abc":
            x, y, z = rng.sample([w for w in usable if w not in (io, s)], 3)
            corr = _fill(templates[ti], x, y, z, place, obj)
        else:
            corr = _fill(templates[ti], a, b, io, place, obj)
        meta = {"task": "ioi", "template": templates[ti], "order": order, "corruption": corruption, "io": io, "s": s}
        return clean, corr, io, s, meta

    return TaskPairs(_generate(n, seed, draw, tokenizer, dropped, "ioi_pairs"), dropped)


# --------------------------------------------------------------------------- Doc-String
def docstring_text(fn: str, args: Sequence[str], descs: Sequence[str], doc: str, n_documented: int) -> str:
    """A Doc-String prompt: the def, a docstring, ``n_documented`` ``:param`` lines and an open ``:param``.

    Args:
        fn: function name; args: all argument names in order; descs: one description per
        documented argument (at least ``n_documented``); doc: the docstring's summary line.
    """
    text = DOCSTRING_HEADER.format(fn=fn, args=", ".join(args), desc=doc)
    for arg, d in zip(args[:n_documented], descs):
        text += DOCSTRING_PARAM.format(arg=arg, desc=d)
    return text + DOCSTRING_OPEN


def random_description(rng: random.Random, lo: int = 2, hi: int = 4) -> str:
    """A few random description words (the docstring filler)."""
    return " ".join(rng.choice(DESCRIPTION_WORDS) for _ in range(rng.randint(lo, hi)))


def docstring_pairs(
    tokenizer: Any,
    n: int,
    seed: int = 0,
    args: Sequence[str] | None = None,
    n_args: int = 3,
    n_documented: int | None = None,
    function_names: Sequence[str] | None = None,
    pair_filter: Callable[[Sequence[str], int], bool] | None = None,
) -> TaskPairs:
    """Doc-String pairs: predict the next argument name after the last documented ``:param``.

    Args:
        tokenizer: any Hugging Face tokenizer.
        n: number of pairs; seed: same seed, same pairs.
        args: candidate argument names (default :data:`ARGS`); multi-token / unknown ones are dropped.
        n_args: arguments in the def (>= 3 recommended); n_documented: documented ``:param`` lines
            before the open one (default ``n_args - 1``), so the target is ``args[n_documented]``.
        function_names: candidate function names (default :data:`FUNCTION_NAMES`).
        pair_filter: optional predicate ``(clean_args, target_index) -> bool``; rejected draws are redrawn.
    Returns:
        :class:`TaskPairs`; ``s_clean`` is the corrupted prompt's answer (the replacement argument
        at the target position). ``dropped`` keys: ``multi_token_args``, ``unk_args``, ``length_mismatch``.
    """
    k = n_args - 1 if n_documented is None else n_documented
    if not 0 <= k < n_args:
        raise ValueError(f"n_documented must be in [0, n_args); got {k} with n_args={n_args}")
    usable, multi, unknown = single_token_words(tokenizer, args or ARGS)
    dropped = {"multi_token_args": multi, "unk_args": unknown, "length_mismatch": 0}
    if len(usable) < 2 * n_args:
        raise DataFormatError(
            f"docstring_pairs: only {len(usable)} argument names are single tokens for this tokenizer "
            f"(dropped {dropped}); n_args={n_args} needs at least {2 * n_args}"
        )
    fns = list(function_names or FUNCTION_NAMES)

    def draw(rng: random.Random) -> tuple[str, str, str, str, dict] | None:
        fn = rng.choice(fns)
        clean_args = rng.sample(usable, n_args)
        corr_args = rng.sample([w for w in usable if w not in clean_args], n_args)
        doc = random_description(rng)
        descs = [random_description(rng) for _ in range(k)]
        if pair_filter is not None and not pair_filter(clean_args, k):
            return None
        clean = docstring_text(fn, clean_args, descs, doc, k)
        # The corrupted prompt keeps the docstring (documenting the clean names) but not the def.
        clean_header = DOCSTRING_HEADER.format(fn=fn, args=", ".join(clean_args), desc=doc)
        corr = DOCSTRING_HEADER.format(fn=fn, args=", ".join(corr_args), desc=doc) + clean[len(clean_header) :]
        meta = {"task": "docstring", "function": fn, "args": clean_args, "corr_args": corr_args, "target_index": k}
        return clean, corr, clean_args[k], corr_args[k], meta

    return TaskPairs(_generate(n, seed, draw, tokenizer, dropped, "docstring_pairs"), dropped)


# --------------------------------------------------------------------------- dispatch
def generate_task(task: Task, tokenizer: Any, n: int, seed: int = 0, **kwargs: Any) -> TaskPairs:
    """``ioi_pairs`` or ``docstring_pairs`` by name; extra keyword arguments are passed through."""
    if task == "ioi":
        return ioi_pairs(tokenizer, n, seed=seed, **kwargs)
    if task == "docstring":
        return docstring_pairs(tokenizer, n, seed=seed, **kwargs)
    raise ValueError(f"unknown task {task!r}; expected 'ioi' or 'docstring'")
