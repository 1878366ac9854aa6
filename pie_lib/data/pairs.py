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
    """A clean prompt, its corrupted twin, and the correct / wrong next-token targets."""

    text_clean: str
    text_corr: str
    io_clean: str
    s_clean: str
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    def prompt_id(self) -> str:
        """A short stable hash of the texts and targets: the same pair has the same id in every run."""
        import hashlib
        import json

        key = json.dumps([self.text_clean, self.text_corr, self.io_clean, self.s_clean], ensure_ascii=False)
        return hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]

    def to_json(self) -> dict:
        d = asdict(self)
        if not d["meta"]:
            d.pop("meta")
        return d


def load_pairs(path: str | os.PathLike, limit: int | None = None) -> list[Pair]:
    """Read pairs from a JSONL file; a malformed line is an error naming the file and line."""
    path = Path(path)
    if not path.exists():
        raise DataFormatError(f"{path}: no such file; pass a JSONL file of pairs or use --task ioi|docstring")
    if path.is_dir():
        raise DataFormatError(f"{path} is a folder; pass a JSONL file of pairs")
    pairs: list[Pair] = []
    try:
        _read_lines(path, limit, pairs)
    except UnicodeDecodeError as exc:
        raise DataFormatError(
            f"{path}: not UTF-8 text (byte {exc.object[exc.start : exc.start + 1]!r} at offset {exc.start}); "
            "expected JSONL, one pair object per line"
        ) from None
    if not pairs:
        raise DataFormatError(f"{path}: the file holds no pairs (it is empty); expected one JSON object per line")
    return pairs


def _read_lines(path: Path, limit: int | None, pairs: list[Pair]) -> None:
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataFormatError(f"{path}:{lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(obj, dict):
                raise DataFormatError(f"{path}:{lineno}: expected a JSON object with keys {list(REQUIRED_KEYS)}")
            missing = [k for k in REQUIRED_KEYS if k not in obj]
            if missing:
                raise DataFormatError(
                    f"{path}:{lineno}: missing key(s) {missing}; each line needs {list(REQUIRED_KEYS)}"
                )
            bad = [k for k in REQUIRED_KEYS if not isinstance(obj[k], str) or not obj[k]]
            if bad:
                raise DataFormatError(f"{path}:{lineno}: key(s) {bad} must be non-empty strings")
            meta = {k: v for k, v in obj.items() if k not in REQUIRED_KEYS}
            meta = meta.get("meta", meta) if isinstance(meta.get("meta", meta), dict) else meta
            pairs.append(Pair(*(obj[k] for k in REQUIRED_KEYS), meta=meta))
            if limit is not None and len(pairs) >= limit:
                break


def save_pairs(pairs: list[Pair], path: str | os.PathLike) -> Path:
    """Write pairs as JSONL, atomically."""
    return write_jsonl(path, [p.to_json() for p in pairs], ensure_ascii=False)
