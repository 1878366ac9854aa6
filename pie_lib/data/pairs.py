"""Clean/corrupted prompt pairs and their JSONL format (spec §1).

One JSON object per line::

    {"text_clean": "...", "text_corr": "...", "io_clean": " Mary", "s_clean": " John"}

``io_clean`` is the correct target, ``s_clean`` the wrong one. A target string's token is the
**last** token of its tokenisation.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pie_lib.errors import DataFormatError
from pie_lib.store import write_jsonl

REQUIRED_KEYS = ("text_clean", "text_corr", "io_clean", "s_clean")


@dataclass(frozen=True)
class Pair:
    """A clean prompt, its corrupted twin, and the correct / wrong next-token targets.

    ``where`` names the pair's source for error messages (``"pairs.jsonl:17"`` for a file line;
    empty for generated pairs); it is not part of the pair's value.
    """

    text_clean: str
    text_corr: str
    io_clean: str
    s_clean: str
    meta: dict = field(default_factory=dict, compare=False, hash=False)
    where: str = field(default="", compare=False, hash=False)

    def prompt_id(self) -> str:
        """A short stable hash of the texts and targets: the same pair has the same id in every run."""
        import hashlib
        import json

        key = json.dumps([self.text_clean, self.text_corr, self.io_clean, self.s_clean], ensure_ascii=False)
        return hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("where")
        if not d["meta"]:
            d.pop("meta")
        return d


def load_pairs(path: str | os.PathLike, limit: int | None = None) -> list[Pair]:
    """Read pairs from a JSONL file; a malformed line is an error naming the file and line.

    Args:
        path: the JSONL file; limit: read only the first ``limit`` pairs (None = every pair).
    Returns:
        The pairs, each with ``where = "<path>:<line>"``.
    """
    if not os.fspath(path).strip():
        raise DataFormatError("--data '' is empty; pass a JSONL file of pairs or use --task ioi|docstring")
    path = Path(path)
    if not path.exists():
        raise DataFormatError(f"{path}: no such file; pass a JSONL file of pairs or use --task ioi|docstring")
    if path.is_dir():
        raise DataFormatError(f"{path} is a folder; pass a JSONL file of pairs")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise DataFormatError(f"{path}: limit {limit!r} must be a positive number of pairs (or None for all)")
    pairs: list[Pair] = []
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataFormatError(f"{path}: cannot be read ({exc.strerror or exc}); pass a readable JSONL file") from None
    _parse_lines(path, data, limit, pairs)
    if not pairs:
        raise DataFormatError(f"{path}: the file holds no pairs (it is empty); expected one JSON object per line")
    return pairs


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(items: list[tuple[str, object]]) -> dict:
    """``object_pairs_hook``: a key given twice is ambiguous (json would silently keep the last)."""
    out: dict = {}
    for k, v in items:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


def _parse_lines(path: Path, data: bytes, limit: int | None, pairs: list[Pair]) -> None:
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        where = f"{path}:{lineno}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DataFormatError(
                f"{where}: not UTF-8 text (byte {raw[exc.start : exc.start + 1]!r} at column {exc.start + 1}); "
                "expected JSONL, one pair object per line, UTF-8 encoded"
            ) from None
        if not line.strip():
            continue
        try:
            obj = json.loads(line, object_pairs_hook=_no_duplicates)
        except json.JSONDecodeError as exc:
            raise DataFormatError(
                f"{where}: invalid JSON ({exc.msg} at column {exc.colno}); expected one pair object per line"
            ) from None
        except _DuplicateKey as exc:
            raise DataFormatError(f"{where}: key {exc.args[0]!r} is given twice; keep one") from None
        except RecursionError:
            raise DataFormatError(
                f"{where}: invalid JSON (nested too deeply); expected one pair object per line"
            ) from None
        if not isinstance(obj, dict):
            raise DataFormatError(
                f"{where}: expected a JSON object with keys {list(REQUIRED_KEYS)}, got a JSON {type(obj).__name__}"
            )
        missing = [k for k in REQUIRED_KEYS if k not in obj]
        if missing:
            raise DataFormatError(f"{where}: missing key(s) {missing}; each line needs {list(REQUIRED_KEYS)}")
        bad = [k for k in REQUIRED_KEYS if not isinstance(obj[k], str) or not obj[k]]
        if bad:
            got = ", ".join(f"{k}={obj[k]!r}" for k in bad)[:200]
            raise DataFormatError(f"{where}: key(s) {bad} must be non-empty strings (got {got})")
        for k in REQUIRED_KEYS:
            try:
                obj[k].encode("utf-8")
            except UnicodeEncodeError:
                raise DataFormatError(
                    f"{where}: {k} holds an invalid Unicode escape (a lone surrogate such as \\ud800); fix the text"
                ) from None
        meta = {k: v for k, v in obj.items() if k not in REQUIRED_KEYS}
        if isinstance(meta.get("meta"), dict):
            meta = meta["meta"]
        pairs.append(Pair(*(obj[k] for k in REQUIRED_KEYS), meta=meta, where=where))
        if limit is not None and len(pairs) >= limit:
            break


def save_pairs(pairs: list[Pair], path: str | os.PathLike) -> Path:
    """Write pairs as JSONL, atomically."""
    return write_jsonl(path, [p.to_json() for p in pairs], ensure_ascii=False)
