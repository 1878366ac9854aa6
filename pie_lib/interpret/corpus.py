"""Corpora for activation examples: the toy world's own text, local files, Hugging Face datasets.

A corpus is cut into *contexts*: each document is tokenized (with the tokenizer's BOS, prepended
by hand when the tokenizer does not add one), and its first ``max_chunks_per_doc`` windows of at
most ``ctx_len`` tokens become contexts. Every context keeps its text and the character span of
each token, so examples can be shown with exact highlighting.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from pie_lib.errors import DataFormatError, MissingDependencyError


@dataclass
class CorpusConfig:
    """Where the text comes from and how it is cut.

    Attributes:
        source: "toy" (the toy world's corpus generator), a ``.txt`` file (one document per line),
            a ``.jsonl`` file (one object per line with a ``text_field``), or a Hugging Face
            dataset name (streamed with ``datasets``; ``hf_config`` / ``split`` select it).
        n_docs: documents to read (the first ones; toy: how many to generate).
        seed: seed of the toy corpus generator.
        ctx_len: tokens per context, BOS included.
        max_chunks_per_doc: windows taken from one document.
        text_field: the text field of ``.jsonl`` / Hugging Face rows.
        split: the Hugging Face dataset split.
        hf_config: the Hugging Face dataset config name.
    """

    source: str = "toy"
    n_docs: int = 2000
    seed: int = 12345
    ctx_len: int = 64
    max_chunks_per_doc: int = 1
    text_field: str = "text"
    split: str = "train"
    hf_config: str | None = None


@dataclass
class Context:
    """One window of tokens: ids ``[T]`` (BOS first), its text, token spans ``[T]`` in ``text``."""

    ctx_id: int
    doc_id: int
    token_ids: list[int]
    text: str
    starts: list[int]
    ends: list[int]


def _toy_docs(n: int, seed: int) -> list[str]:
    from pie_lib.toy.corpus import training_texts

    out: Any = training_texts(n, seed=seed)
    # training_texts returns texts, or (texts, kinds) in newer versions of the toy world
    if isinstance(out, tuple):
        out = out[0]
    return list(out)


def iter_documents(cfg: CorpusConfig) -> Iterator[str]:
    """The corpus's documents, at most ``cfg.n_docs`` of them, in a fixed order."""
    src = cfg.source
    if src == "toy":
        yield from _toy_docs(cfg.n_docs, cfg.seed)
        return
    path = Path(src).expanduser()
    if path.exists():
        yield from _file_docs(path, cfg)
        return
    if path.suffix in (".txt", ".jsonl", ".json") or "/" not in src and "." in src:
        raise DataFormatError(
            f"corpus file {src!r} does not exist; pass an existing .txt / .jsonl file, 'toy', or a dataset name"
        )
    yield from _hf_docs(cfg)


def _file_docs(path: Path, cfg: CorpusConfig) -> Iterator[str]:
    n = 0
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if n >= cfg.n_docs:
                return
            line = line.rstrip("\n")
            if not line.strip():
                continue
            if path.suffix in (".jsonl", ".json"):
                try:
                    obj = json.loads(line)
                    text = obj[cfg.text_field]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise DataFormatError(
                        f"{path}:{lineno}: expected a JSON object with a {cfg.text_field!r} string field"
                    ) from None
                if not isinstance(text, str):
                    raise DataFormatError(f"{path}:{lineno}: field {cfg.text_field!r} is not a string")
            else:
                text = line
            n += 1
            yield text


def _hf_docs(cfg: CorpusConfig) -> Iterator[str]:
    try:
        import datasets  # pyright: ignore[reportMissingImports]  # optional extra (pie_lib[data])
    except ImportError:
        raise MissingDependencyError(
            f"corpus {cfg.source!r} looks like a Hugging Face dataset name; reading it needs the datasets "
            "package: pip install datasets (or pass a local .txt / .jsonl file)"
        ) from None
    try:
        ds = datasets.load_dataset(cfg.source, cfg.hf_config, split=cfg.split, streaming=True)
    except Exception as exc:
        raise DataFormatError(
            f"Hugging Face dataset {cfg.source!r} (config {cfg.hf_config}, split {cfg.split}) could not be opened "
            f"({type(exc).__name__}); check the name, or download it and pass a local .jsonl file"
        ) from None
    for n, row in enumerate(ds):
        if n >= cfg.n_docs:
            return
        text = row.get(cfg.text_field)
        if not isinstance(text, str):
            raise DataFormatError(
                f"dataset {cfg.source!r} rows have no string field {cfg.text_field!r}; pass --text-field"
            )
        yield text


def _bos_policy(tokenizer: Any) -> int | None:
    """The BOS id to prepend by hand, or None when the tokenizer adds it itself (or has none)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    probe = tokenizer("a")["input_ids"]
    return None if probe and probe[0] == bos else int(bos)


def _tokens_with_spans(tokenizer: Any, doc: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of ``doc`` and each token's character span (fast tokenizers report offsets;
    for slow ones the spans are rebuilt by decoding the tokens one by one)."""
    try:
        enc = tokenizer(doc, add_special_tokens=False, return_offsets_mapping=True)
        return list(enc["input_ids"]), [(int(a), int(b)) for a, b in enc["offset_mapping"]]
    except (NotImplementedError, ValueError, TypeError, KeyError):
        ids = list(tokenizer(doc, add_special_tokens=False)["input_ids"])
        spans, cursor = [], 0
        for i in ids:
            piece = tokenizer.decode([i])
            at = doc.find(piece.strip(), cursor) if piece.strip() else cursor
            at = cursor if at < 0 else at
            spans.append((at, at + len(piece.strip())))
            cursor = at + len(piece.strip())
        return ids, spans


def make_contexts(
    tokenizer: Any, docs: list[str], cfg: CorpusConfig, first_doc_id: int = 0, first_ctx_id: int = 0
) -> list[Context]:
    """Tokenize ``docs`` into contexts of at most ``cfg.ctx_len`` tokens (see module docstring)."""
    manual_bos = _bos_policy(tokenizer)
    auto_bos = manual_bos is None and getattr(tokenizer, "bos_token_id", None) is not None
    out: list[Context] = []
    ctx_id = first_ctx_id
    body_len = cfg.ctx_len - 1  # one slot for BOS
    for j, doc in enumerate(docs):
        ids, offs = _tokens_with_spans(tokenizer, doc)
        bos = manual_bos if manual_bos is not None else (tokenizer.bos_token_id if auto_bos else None)
        for c in range(cfg.max_chunks_per_doc):
            piece, poffs = ids[c * body_len : (c + 1) * body_len], offs[c * body_len : (c + 1) * body_len]
            if not piece:
                break
            lo, hi = poffs[0][0], poffs[-1][1]
            starts = [s - lo for s, _ in poffs]
            ends = [e - lo for _, e in poffs]
            if bos is not None:
                piece, starts, ends = [int(bos), *piece], [0, *starts], [0, *ends]
            out.append(Context(ctx_id, first_doc_id + j, [int(i) for i in piece], doc[lo:hi], starts, ends))
            ctx_id += 1
    return out
