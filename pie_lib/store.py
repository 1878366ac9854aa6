"""Crash-safe result files: append-only JSONL for rows as they finish, atomic rewrites otherwise.

A kill can interrupt an append mid-line; readers drop an incomplete *last* line (it was never
acknowledged as finished) and the next append first truncates it away. Whole files (parquet,
json, text, JSONL rewrites) are written to a temp file and renamed into place, so they are either
old or new, never half: :func:`write_atomic` is the one place that does this, every other writer
(here and in the rest of pie_lib) goes through it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import tempfile
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

from pie_lib.errors import ConfigMismatchError, DataFormatError, FolderBusyError, OutputPathError

if TYPE_CHECKING:  # pandas costs ~0.4 s to import; `pie --help` reaches this module
    import pandas as pd


def append_jsonl(path: str | os.PathLike, rows: Iterable[dict[str, Any]]) -> None:
    """Append rows as one write, flushed and fsynced."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    repair_jsonl(path)
    payload = "".join(json.dumps(r, default=_jsonable) + "\n" for r in rows)
    if not payload:
        return
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(payload)
        fh.flush()
        os.fsync(fh.fileno())


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read rows; a malformed line is an error naming it -- except a *torn* last line.

    The text after the last newline is a row when it parses as a JSON object (a hand-written file
    without a final newline; or a kill just before the newline), and is dropped otherwise: an
    append cut by a kill was never a finished row.
    """
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_bytes().split(b"\n")
    rows = []
    for i, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        last = i == len(lines)
        try:
            row = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            if last:
                break  # torn tail
            why = {UnicodeDecodeError: "not UTF-8 text", RecursionError: "nested too deeply"}.get(type(exc))
            raise DataFormatError(
                f"{path}:{i}: corrupt line ({why or getattr(exc, 'msg', exc)}); delete the file to recompute it"
            ) from None
        if not isinstance(row, dict):
            if last:
                break
            raise DataFormatError(
                f"{path}:{i}: corrupt line (a JSON {type(row).__name__}, not a row object); "
                "delete the file to recompute it"
            )
        rows.append(row)
    return rows


def repair_jsonl(path: str | os.PathLike) -> int:
    """End the file at its last complete row, keeping every complete row byte for byte.

    A last line without a newline is kept (newline added) when it is a whole JSON object, cut when
    it is not (a kill mid-append). Returns the number of bytes cut (0: nothing torn).
    """
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return 0
    data = path.read_bytes()
    if data.endswith(b"\n"):
        return 0
    cut = data.rfind(b"\n") + 1
    tail = data[cut:]
    try:
        whole = isinstance(json.loads(tail.decode("utf-8")), dict)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        whole = False
    if whole:
        with open(path, "ab") as fh:
            fh.write(b"\n")
            fh.flush()
            os.fsync(fh.fileno())
        return 0
    with open(path, "rb+") as fh:
        fh.truncate(cut)
        fh.flush()
        os.fsync(fh.fileno())
    return len(tail)


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


def write_parquet_columns(
    columns: dict[str, list[Any]], path: str | os.PathLike, types: dict[str, str] | None = None
) -> Path:
    """A table of plain Python columns as parquet, atomically, through pyarrow alone.

    ``pie prune`` writes its tables with this: pandas costs ~0.3 s to import, and pyarrow's
    ``pa.array`` imports it too, so the arrays are built from their buffers. ``types`` names a
    column's arrow type (``int64``, ``float64``, ``bool``, ``string``, ``large_string``); other
    columns are inferred as pandas would store them (ints ``int64``, ints mixed with floats
    ``float64``, strings ``large_string`` (pandas' ``str``; an ``object`` column is ``string``),
    all None a null column). NaN and None are nulls, as pandas writes them; read back with
    :func:`read_parquet`.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    types = types or {}
    arrays = [_arrow_array(pa, name, values, types.get(name)) for name, values in columns.items()]
    table = pa.Table.from_arrays(arrays, names=list(columns))
    return write_atomic(path, lambda p: pq.write_table(table, p))


def _column_kind(name: str, values: list[Any]) -> str:
    kinds = {type(v) for v in values if v is not None}
    if not kinds:
        return "null"
    for kind, allowed in (("bool", {bool}), ("int64", {int}), ("float64", {int, float}), ("large_string", {str})):
        if kinds <= allowed:
            return kind
    raise TypeError(f"column {name!r} mixes {sorted(k.__name__ for k in kinds)}; give it one type")


def _arrow_array(pa: Any, name: str, values: list[Any], kind: str | None) -> Any:
    """One column as a pyarrow array, from numpy buffers (``pa.array`` would import pandas)."""
    import numpy as np

    kind = kind or _column_kind(name, values)
    n = len(values)
    if kind == "null":
        return pa.nulls(n)
    valid = np.fromiter((v is not None for v in values), dtype=bool, count=n)
    if kind == "float64":
        data = np.fromiter((float("nan") if v is None else v for v in values), dtype=np.float64, count=n)
        valid &= ~np.isnan(data)  # pandas stores NaN as a null
    elif kind == "int64":
        data = np.fromiter((0 if v is None else v for v in values), dtype=np.int64, count=n)
    elif kind == "bool":
        bits = np.fromiter((bool(v) for v in values), dtype=bool, count=n)
        data = np.packbits(bits, bitorder="little")
    elif kind in ("string", "large_string"):
        encoded = [b"" if v is None else v.encode("utf-8") for v in values]
        offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(np.fromiter(map(len, encoded), dtype=np.int64, count=n), out=offsets[1:])
        if kind == "string":
            if offsets[-1] >= 2**31:
                raise ValueError(f"column {name!r}: {offsets[-1]} bytes of text; store it as large_string")
            offsets = offsets.astype(np.int32)
        validity = None if valid.all() else pa.py_buffer(np.packbits(valid, bitorder="little"))
        buffers = [validity, pa.py_buffer(offsets), pa.py_buffer(b"".join(encoded))]
        return pa.Array.from_buffers(getattr(pa, kind)(), n, buffers)
    else:
        raise ValueError(f"column {name!r}: unknown type {kind!r}; use int64, float64, bool, string or large_string")
    validity = None if valid.all() else pa.py_buffer(np.packbits(valid, bitorder="little"))
    arrow_type = {"float64": pa.float64(), "int64": pa.int64(), "bool": pa.bool_()}[kind]
    return pa.Array.from_buffers(arrow_type, n, [validity, pa.py_buffer(data)])


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


# ----------------------------------------------------------------------------- one folder, one writer
LOCK_NAME = ".pie.lock"


def lock_path(folder: str | os.PathLike, shard: str | None = None) -> Path:
    """``folder/.pie.lock``, or ``folder/.pie.lock.shard-I-of-N`` for shard ``"I/N"`` (one writer each)."""
    if not shard:
        return Path(folder) / LOCK_NAME
    return Path(folder) / f"{LOCK_NAME}.shard-{str(shard).strip().replace('/', '-of-')}"


def _holder(fd: int) -> dict[str, Any]:
    try:
        data = os.pread(fd, 4096, 0)
        info = json.loads(data.decode("utf-8")) if data.strip() else {}
        return info if isinstance(info, dict) else {}
    except (OSError, ValueError):
        return {}


def _pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _busy(folder: Path, lock: Path, info: dict[str, Any], what: str) -> FolderBusyError:
    pid = info.get("pid", "unknown")
    host = info.get("host")
    since = info.get("started")
    where = f" on {host}" if host and host != socket.gethostname() else ""
    return FolderBusyError(
        f"{folder} is being written by another run ({info.get('command') or what}, PID {pid}{where}"
        f"{', since ' + since if since else ''}); wait for it to finish, stop it (kill {pid}), or pass another --out"
        f" (lock file {lock.name})"
    )


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, shard: str | None = None, what: str = "pie"):
    """Hold the writer lock of ``folder`` (per shard) for the duration of the block.

    A second holder is refused with :class:`FolderBusyError` naming the live PID. The lock is an
    ``flock`` on ``.pie.lock``: the kernel drops it when its process dies, so the file a killed run
    leaves behind is a stale lock that the next run takes over (with a warning naming the dead PID).
    On file systems without ``flock`` the PID recorded in the file decides (alive => busy).
    The folder must exist; the lock file is removed on exit.
    """
    folder = Path(folder)
    path = lock_path(folder, shard)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            info = _holder(fd)
            os.close(fd)
            raise _busy(folder, path, info, what) from None
        except OSError:  # no flock here (some network file systems): trust the recorded PID
            info = _holder(fd)
            if (
                _pid_alive(info.get("pid"))
                and info.get("pid") != os.getpid()
                and info.get("host", socket.gethostname()) == socket.gethostname()
            ):
                os.close(fd)
                raise _busy(folder, path, info, what) from None
        try:  # the previous holder may have unlinked the file between our open and our flock
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    old = _holder(fd)
    if old.get("pid") not in (None, os.getpid()):
        warnings.warn(
            f"{folder}: took over the stale lock of PID {old.get('pid')} (that run is no longer running)", stacklevel=3
        )
    info = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": what,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
    os.fsync(fd)
    try:
        yield path
    finally:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        os.close(fd)


def read_parquet(path: str | os.PathLike, what: str, fix: str, columns: Iterable[str] = ()) -> pd.DataFrame:
    """Read a parquet table written by pie_lib; a damaged or foreign file is a one-line error.

    Args:
        path: the file; what: what it should be (e.g. "descriptions table"); fix: what to do when it
            is not (e.g. "rerun `pie interpret`"); columns: columns it must have.
    """
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"{path}: no such file ({what}); {fix}")
    try:
        df = pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises its own types for truncated / foreign files
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise DataFormatError(f"{path}: not a readable parquet file ({what}; {first}); {fix}") from None
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise DataFormatError(f"{path}: the {what} lacks column(s) {missing}; {fix}")
    return df


@contextlib.contextmanager
def own_folder(
    out: str | os.PathLike,
    shard: str | None = None,
    what: str = "pie prune",
    jsonl: tuple[str, ...] = ("results.jsonl", "selections.jsonl"),
    say: Callable[[str], None] = print,
) -> Iterator[Path]:
    """Create ``out`` if needed and hold its writer lock (per shard) for the block.

    Torn last lines of the ``jsonl`` files (a kill mid-append) are cut, keeping every finished row,
    and reported. A folder this call created is removed again if the block leaves it empty
    (bad input found late leaves nothing behind).
    """
    out = Path(out)
    created = [p for p in (out, *out.parents) if not p.exists()]  # deepest first
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputPathError(f"--out {out}: cannot create the folder ({exc.strerror or exc})") from None
    try:
        with folder_lock(out, shard=shard, what=what):
            for name in jsonl:
                cut = repair_jsonl(out / name)
                if cut:
                    say(
                        f"repaired {out / name}: cut an incomplete last line ({cut} bytes, left by a killed run); "
                        "every finished row is kept"
                    )
            yield out
    finally:
        for folder in created:  # only succeeds while empty: rows written are never touched
            try:
                folder.rmdir()
            except OSError:
                break
