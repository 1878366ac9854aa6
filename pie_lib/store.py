"""Crash-safe result files: append-only JSONL for rows as they finish, atomic rewrites otherwise.

A kill can interrupt an append mid-line; readers drop an incomplete *last* line (it was never
acknowledged as finished) and the next append first truncates it away. Whole files (parquet,
json, text, JSONL rewrites) are written to a temp file and renamed into place, so they are either
old or new, never half: :func:`write_atomic` is the one place that does this, every other writer
(here and in the rest of pie_lib) goes through it.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

from pie_lib.errors import ConfigMismatchError, DataFormatError, OutputPathError

if TYPE_CHECKING:  # pandas costs ~0.4 s to import; `pie --help` reaches this module
    import pandas as pd


def _clean_tail(path: Path) -> None:
    """Cut an unterminated last line (left by a kill mid-append)."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as fh:
        fh.seek(-1, os.SEEK_END)
        if fh.read(1) == b"\n":
            return
        data = fh.seek(0) or fh.read()
        cut = data.rfind(b"\n") + 1
        fh.truncate(cut)


def append_jsonl(path: str | os.PathLike, rows: Iterable[dict[str, Any]]) -> None:
    """Append rows as one write, flushed and fsynced."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _clean_tail(path)
    payload = "".join(json.dumps(r, default=_jsonable) + "\n" for r in rows)
    if not payload:
        return
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(payload)
        fh.flush()
        os.fsync(fh.fileno())


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read rows; an incomplete last line is ignored, a malformed line elsewhere is an error."""
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").split("\n")
    complete = lines[:-1]  # the text after the last newline is incomplete (or empty)
    rows = []
    for i, line in enumerate(complete, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise DataFormatError(f"{path}:{i}: corrupt line ({exc.msg}); delete the file to recompute it") from None
    return rows


def write_atomic(path: str | os.PathLike, writer: Callable[[Path], object]) -> Path:
    """Call ``writer(tmp_path)`` then rename the temp file onto ``path`` (parents are created).

    The temp file is ``.<name>.<random>`` next to ``path`` (same file system, so the rename is
    atomic); it is removed if ``writer`` fails, and :func:`remove_stale_temps` clears one a kill left.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + path.name + ".", dir=path.parent)
    os.close(fd)
    try:
        writer(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def remove_stale_temps(folder: str | os.PathLike, names: Iterable[str]) -> int:
    """Delete temp files that :func:`write_atomic` left for ``names`` when a run was killed mid-write.

    They are named ``.<name>.<random>``; only this module creates them, so they are never real data.
    """
    folder = Path(folder)
    n = 0
    for name in names:
        for tmp in folder.glob(f".{name}.*"):
            tmp.unlink(missing_ok=True)
            n += 1
    return n


def write_parquet(df: pd.DataFrame, path: str | os.PathLike) -> Path:
    return write_atomic(path, lambda p: df.to_parquet(p, index=False))


def write_json(
    obj: Any, path: str | os.PathLike, indent: int | None = 2, default: Callable[[Any], Any] | None = None
) -> Path:
    """``obj`` as JSON (tensors and arrays as numbers/lists, paths as strings unless ``default`` is given)."""
    return write_text(path, json.dumps(obj, indent=indent, default=default or _jsonable))


def write_text(path: str | os.PathLike, text: str) -> Path:
    """``text`` (UTF-8) to ``path``, atomically."""
    return write_atomic(path, lambda p: p.write_text(text, encoding="utf-8"))


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict[str, Any]], ensure_ascii: bool = True) -> Path:
    """Rewrite ``path`` with one JSON object per line, atomically (appends: :func:`append_jsonl`)."""
    return write_text(path, "".join(json.dumps(r, ensure_ascii=ensure_ascii) + "\n" for r in rows))


# ----------------------------------------------------------------------------- folder configurations
def read_config(path: str | os.PathLike, what: str = "pie") -> dict[str, Any] | None:
    """The JSON object a results folder stores its configuration in; None when the file is missing.

    A corrupt file or one that is not a JSON object is an :class:`OutputPathError` (``what`` names
    the kind of folder in the message: "pie prune", "pie interpret"...).
    """
    path = Path(path)
    if not path.exists():
        return None
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise OutputPathError(
            f"{path}: corrupt config file ({exc}); it is not a {what} results folder, or it was damaged -- "
            "use a new --out folder"
        ) from None
    if not isinstance(stored, dict):
        raise OutputPathError(f"{path}: not a {what} config (expected a JSON object); use a new --out folder")
    return stored


def check_same_config(
    stored: dict[str, Any] | None, current: dict[str, Any], message: str, keys: Iterable[str] | None = None
) -> None:
    """THE configuration-mismatch check: refuse to mix results made under other settings in one folder.

    ``current`` is compared with ``stored`` after a JSON round trip (so tuples, paths and dtypes
    compare as they were written); nothing is checked when ``stored`` is None (a new folder).

    Args:
        keys: the keys compared (default: every key of either side).
        message: the error, with ``{keys}`` replaced by the sorted list of differing keys.
    """
    if stored is None:
        return
    current = json.loads(json.dumps(current, default=str))
    names = set(stored) | set(current) if keys is None else set(keys)
    diff = sorted(k for k in names if stored.get(k) != current.get(k))
    if diff:
        raise ConfigMismatchError(message.replace("{keys}", str(diff)))


def _jsonable(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
