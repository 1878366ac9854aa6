"""The toy world's synthetic, seeded, word-level corpus: IOI, Doc-String and filler text.

Every text is built from the word lists and templates of :mod:`pie_lib.data.tasks`, so the
corpus and the pair generators agree. What is held out of training (and used for evaluation):

- IOI: the templates :data:`~pie_lib.data.tasks.IOI_HELDOUT_TEMPLATES` (unseen prefix/action
  combinations) and the unordered name pairs with :func:`~pie_lib.data.tasks.is_heldout_names`
  (every name is seen in training, never in such a pair as IO/S);
- Doc-String: ordered argument bigrams with :func:`~pie_lib.data.tasks.is_heldout_args` never sit
  next to each other in a training def; evaluation targets follow such a bigram.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Sequence

from pie_lib.data.tasks import (
    ARGS,
    DESCRIPTION_WORDS,
    DOCSTRING_HEADER,
    DOCSTRING_PARAM,
    FUNCTION_NAMES,
    IOI_HELDOUT_TEMPLATES,
    IOI_TEMPLATES,
    IOI_TRAIN_TEMPLATES,
    NAMES,
    OBJECTS,
    PLACES,
    TaskPairs,
    docstring_pairs,
    ioi_pairs,
    is_heldout_args,
    is_heldout_names,
    random_description,
)

ADJECTIVES: tuple[str, ...] = (
    "red",
    "big",
    "small",
    "old",
    "new",
    "quiet",
    "busy",
    "warm",
    "cold",
    "bright",
    "dark",
    "happy",
)
FILLER_TEMPLATES: tuple[str, ...] = (
    "{N} likes the {adj} {obj}.",
    "The {obj} in the {place} was {adj}.",
    "{N} went to the {place} and bought a {obj}.",
    "{N} said that the {place} was {adj}.",
    "{N} and {M} like to read about the {obj}.",
    "Every day {N} walks to the {place} with a {obj}.",
    "{N} found a {adj} {obj} near the {place}.",
    "It was a {adj} day at the {place}.",
    "{N} gave the {obj} back.",
    "The {place} is {adj} and the {obj} is {adj2}.",
    "{N} and {M} met at the {place}. It was {adj}.",
    "result = {fn}({arg}, {arg2})",
    "{arg} = {fn}({arg2})",
)


@dataclass(frozen=True)
class ToyCorpusConfig:
    """Mixture weights of the training corpus (they need not sum to 1)."""

    p_ioi: float = 0.30
    p_docstring: float = 0.45  # the Doc-String circuit takes longer to form than IOI's
    p_filler: float = 0.25
    min_args: int = 3
    max_args: int = 5


def _ioi_sentence(rng: random.Random, templates: Sequence[str], heldout: bool) -> str:
    """One full IOI sentence (prompt + answer), with a name pair from the train or held-out split."""
    while True:
        io, s = rng.sample(NAMES, 2)
        if is_heldout_names(io, s) == heldout:
            break
    t = rng.choice(templates)
    a, b = (io, s) if rng.random() < 0.5 else (s, io)
    return t.format(A=a, B=b, C=s, PLACE=rng.choice(PLACES), OBJECT=rng.choice(OBJECTS)) + f" {io}."


def _train_args(rng: random.Random, n: int) -> list[str]:
    """Argument names for a training def: no held-out bigram sits next to another."""
    while True:
        args = rng.sample(ARGS, n)
        if not any(is_heldout_args(a, b) for a, b in zip(args, args[1:])):
            return args


def _docstring_function(rng: random.Random, cfg: ToyCorpusConfig) -> str:
    """A complete function: def, docstring documenting every argument, closing quotes, a body."""
    args = _train_args(rng, rng.randint(cfg.min_args, cfg.max_args))
    fn = rng.choice(FUNCTION_NAMES)
    text = DOCSTRING_HEADER.format(fn=fn, args=", ".join(args), desc=random_description(rng))
    for arg in args:
        text += DOCSTRING_PARAM.format(arg=arg, desc=random_description(rng))
    return text + f'    """\n    return {rng.choice(args)}'


def _filler(rng: random.Random) -> str:
    t = rng.choice(FILLER_TEMPLATES)
    n, m = rng.sample(NAMES, 2)
    arg, arg2 = rng.sample(ARGS, 2)
    return t.format(
        N=n,
        M=m,
        adj=rng.choice(ADJECTIVES),
        adj2=rng.choice(ADJECTIVES),
        obj=rng.choice(OBJECTS),
        place=rng.choice(PLACES),
        fn=rng.choice(FUNCTION_NAMES),
        arg=arg,
        arg2=arg2,
    )


KINDS: tuple[str, ...] = ("ioi", "docstring", "filler")


def training_texts(n: int, seed: int, cfg: ToyCorpusConfig | None = None) -> tuple[list[str], list[str]]:
    """``n`` training texts (one IOI sentence, function or filler sentence each), seeded.

    Returns:
        (texts, kinds) with each kind in :data:`KINDS`.
    """
    cfg = cfg or ToyCorpusConfig()
    rng = random.Random(seed)
    weights = (cfg.p_ioi, cfg.p_docstring, cfg.p_filler)
    texts, kinds = [], []
    for _ in range(n):
        kind = rng.choices(KINDS, weights)[0]
        if kind == "ioi":
            texts.append(_ioi_sentence(rng, IOI_TRAIN_TEMPLATES, heldout=False))
        elif kind == "docstring":
            texts.append(_docstring_function(rng, cfg))
        else:
            texts.append(_filler(rng))
        kinds.append(kind)
    return texts, kinds


def heldout_texts(n: int, seed: int) -> list[str]:
    """``n`` texts outside the training distribution's IOI split (held-out templates and name
    pairs), mixed with freshly drawn functions and filler; used for CLT evaluation (FVU)."""
    rng = random.Random(seed)
    cfg = ToyCorpusConfig()
    out = []
    for i in range(n):
        kind = i % 3
        if kind == 0:
            out.append(_ioi_sentence(rng, IOI_HELDOUT_TEMPLATES, heldout=True))
        elif kind == 1:
            out.append(_docstring_function(rng, cfg))
        else:
            out.append(_filler(rng))
    return out


def heldout_ioi_pairs(tokenizer: Any, n: int, seed: int = 0) -> TaskPairs:
    """IOI pairs on held-out templates with held-out (IO, S) name pairs."""
    return ioi_pairs(tokenizer, n, seed=seed, templates=IOI_HELDOUT_TEMPLATES, pair_filter=is_heldout_names)


def heldout_docstring_pairs(tokenizer: Any, n: int, seed: int = 0) -> TaskPairs:
    """Doc-String pairs (3 args, 2 documented) whose (last documented, target) bigram is held out."""
    return docstring_pairs(tokenizer, n, seed=seed, pair_filter=lambda a, k: is_heldout_args(a[k - 1], a[k]))


def vocabulary_texts() -> list[str]:
    """Texts that between them contain every word the toy world can emit (for the vocabulary)."""
    words = [
        *NAMES,
        *PLACES,
        *OBJECTS,
        *ARGS,
        *FUNCTION_NAMES,
        *DESCRIPTION_WORDS,
        *ADJECTIVES,
    ]
    fill = dict(
        A="", B="", C="", N="", M="", PLACE="", OBJECT="", adj="", adj2="", obj="", place="", fn="", arg="", arg2=""
    )
    skeletons = [t.format(**fill) for t in (*IOI_TEMPLATES, *FILLER_TEMPLATES)]
    a, b = ARGS[:2]
    code = [
        DOCSTRING_HEADER.format(fn=FUNCTION_NAMES[0], args=f"{a}, {b}", desc="the")
        + DOCSTRING_PARAM.format(arg=a, desc="the")
        + f'    """\n    return {a}'
    ]
    return [" ".join(words), *skeletons, *code, "."]
