"""What produced a result: library versions and checkpoint fingerprints, recorded with every run."""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import os
from pathlib import Path

#: Files larger than this are fingerprinted by size + the sha256 of their first and last 4 MiB.
FULL_HASH_LIMIT = 256 * 1024 * 1024


def versions() -> dict[str, str]:
    """Versions of pie_lib and the libraries whose behaviour shapes the numbers."""
    out = {}
    for pkg in ("pie_lib", "torch", "nnsight", "transformers", "safetensors", "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def file_fingerprint(path: Path) -> str:
    """sha256 of the file, or ``partial-sha256:<size>:<hash of head+tail>`` for very large files."""
    size = path.stat().st_size
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        if size <= FULL_HASH_LIMIT:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
            return h.hexdigest()
        h.update(fh.read(4 << 20))
        fh.seek(size - (4 << 20))
        h.update(fh.read())
    return f"partial-sha256:{size}:{h.hexdigest()}"


def checkpoint_fingerprint(path_or_id: str | os.PathLike) -> str:
    """One hash over every weight/config file of a local checkpoint folder (or the id itself)."""
    p = Path(path_or_id)
    if not p.is_dir():
        return f"hub:{path_or_id}"
    h = hashlib.sha256()
    for f in sorted(p.rglob("*")):
        if f.is_file() and f.suffix in {".safetensors", ".json", ".yaml", ".bin", ".model", ".txt"}:
            h.update(f.relative_to(p).as_posix().encode())
            h.update(file_fingerprint(f).encode())
    return h.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    return file_fingerprint(Path(path))
