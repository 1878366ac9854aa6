"""Lazy decoder rows: read only the feature rows a prompt needs, straight from safetensors.

A 524k-feature Llama-3.2-1B CLT has ~9.1e9 decoder values (18 GB in bf16). Each
``W_dec_{l}.safetensors`` file is read row by row with ``os.pread`` (runs of consecutive rows in
one call), so the OS reads only the pages those rows live on and nothing is loaded whole into CPU
memory. Reads go through the page cache but are not mapped into the process: a memory map's
touched pages stay in its resident set, which then grew with every new feature a sweep met (up to
the whole file). Rows fetched for a device (a GPU) are cached there, bounded by ``cache_bytes``
for all layers together, because consecutive prompts share many features. Rows for the CPU are
not cached by default: the OS page cache already keeps the file's recently read pages, outside
the process, and re-reading a row from it is a memory copy; a process-side cache only made the
resident set grow prompt by prompt toward its bound (so a run's peak depended on how many
prompts it ran: +0.35 GiB after the first of three prompts at Gemma-2-2B / 2, measured).
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import torch

from pie_lib.errors import CLTFormatError

_ST_DTYPES: dict[str, tuple[np.dtype, torch.dtype]] = {
    "F32": (np.dtype("<f4"), torch.float32),
    "F16": (np.dtype("<f2"), torch.float16),
    "BF16": (np.dtype("<u2"), torch.bfloat16),  # numpy has no bf16: read raw bits, view in torch
    "F64": (np.dtype("<f8"), torch.float64),
}


def read_safetensors_header(path: Path) -> tuple[dict, int]:
    """Parse a safetensors header.

    Returns:
        (header dict name -> {dtype, shape, data_offsets}, byte offset where the data starts).
    """
    try:
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) != 8:
                raise CLTFormatError(f"{path}: file is truncated (no safetensors header); re-download it")
            (n,) = struct.unpack("<Q", raw)
            size = path.stat().st_size
            if n <= 0 or 8 + n > size:
                raise CLTFormatError(
                    f"{path}: corrupt safetensors header (length {n}, file {size} bytes); re-download it"
                )
            header = json.loads(fh.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        if isinstance(exc, CLTFormatError):
            raise
        raise CLTFormatError(f"{path}: not a readable safetensors file ({exc}); re-download it") from None
    header.pop("__metadata__", None)
    data_start = 8 + n
    for name, info in header.items():
        start, end = info["data_offsets"]
        if data_start + end > size:
            raise CLTFormatError(
                f"{path}: tensor {name!r} extends past the end of the file (truncated download?); re-download it"
            )
    return header, data_start


class SafetensorsRows:
    """A read-only tensor inside a safetensors file, indexed along its first dimension."""

    def __init__(self, path: Path, key: str) -> None:
        header, data_start = read_safetensors_header(path)
        if key not in header:
            raise CLTFormatError(f"{path}: missing tensor {key!r} (found {sorted(header)})")
        info = header[key]
        if info["dtype"] not in _ST_DTYPES:
            raise CLTFormatError(f"{path}: tensor {key!r} has unsupported dtype {info['dtype']}")
        self.np_dtype, self.torch_dtype = _ST_DTYPES[info["dtype"]]
        self.shape = tuple(info["shape"])
        start, _ = info["data_offsets"]
        self.path = path
        self._offset = data_start + start
        self._row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.np_dtype.itemsize
        self._fd: int | None = None

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)  # type: ignore[arg-type]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fd": None}  # a file descriptor does not travel (pickling, workers)

    def rows(self, index: np.ndarray) -> torch.Tensor:
        """Rows ``index`` as a CPU tensor of the file's dtype (sorted indices read fastest: one read
        per run of consecutive rows)."""
        index = np.asarray(index, dtype=np.int64).reshape(-1)
        if index.size and (index.min() < 0 or index.max() >= self.shape[0]):
            raise IndexError(f"{self.path}: row index out of range 0..{self.shape[0] - 1}")
        out = np.empty((index.size, *self.shape[1:]), dtype=self.np_dtype)
        if index.size:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_RDONLY)
            flat = out.reshape(index.size, -1).view(np.uint8)  # [n, row_bytes]
            cut = np.flatnonzero(np.diff(index) != 1) + 1
            for a, b in zip(np.r_[0, cut], np.r_[cut, index.size]):
                want = int(b - a) * self._row_bytes
                got = os.preadv(self._fd, [flat[a:b].data.cast("B")], self._offset + int(index[a]) * self._row_bytes)
                if got != want:
                    raise CLTFormatError(f"{self.path}: file is truncated (row {int(index[a])}); re-download it")
        t = torch.from_numpy(out)
        return t.view(torch.bfloat16) if self.torch_dtype == torch.bfloat16 else t

    def full(self) -> torch.Tensor:
        return self.rows(np.arange(self.shape[0]))


class LazyDecoder:
    """Per-source-layer decoder rows ``[F, n_out(l), D]``, from memory or read from safetensors files.

    Args:
        sources: per layer either an in-memory tensor ``[F, n_out, D]`` or a :class:`SafetensorsRows`.
        cache_rows: how many rows per layer to keep cached on the target device (0 = no cache).
        cache_bytes: at most this many bytes of cached rows over all layers (default 1 GiB): a
            layer's cache holds ``min(cache_rows, cache_bytes / (layers x row bytes))`` rows, and
            never fewer than one call needs. Without it, 65,536 rows per layer is the whole of a
            32,768-feature CLT: 18 GB at Llama-3.2-1B's shape, grown one prompt at a time.
            With neither given, rows are cached off the CPU only (65,536 rows, 1 GiB); giving
            either turns the cache on for every device (the other keeps its default).
        check_finite: refuse file rows holding NaN/Inf as they are read (a lazily loaded
            CLT is never scanned whole, so a corrupt row is caught when first used).
    """

    def __init__(
        self,
        sources: list[torch.Tensor | SafetensorsRows],
        cache_rows: int | None = None,
        check_finite: bool = True,
        cache_bytes: int | None = None,
    ) -> None:
        self.sources = sources
        self.device_only_cache = cache_rows is None and cache_bytes is None
        self.cache_bytes = 1 << 30 if cache_bytes is None else cache_bytes
        self.check_finite = check_finite
        self.device = torch.device("cpu")
        self.dtype: torch.dtype | None = None
        self.cache_rows = 65536 if cache_rows is None else cache_rows
        self._full: list[torch.Tensor | None] = [None] * len(sources)
        self._reset_cache()

    def _reset_cache(self) -> None:
        self._slots: dict[int, torch.Tensor] = {}
        self._blocks: dict[int, torch.Tensor | None] = {}
        self._used: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.sources)

    def shape(self, layer: int) -> tuple[int, ...]:
        return tuple(self.sources[layer].shape)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "LazyDecoder":
        if device is not None:
            self.device = torch.device(device)
        if dtype is not None:
            self.dtype = dtype
        self._reset_cache()
        self._full = [None] * len(self.sources)
        return self

    def _load(self, layer: int, index: np.ndarray | None) -> torch.Tensor:
        src = self.sources[layer]
        if isinstance(src, SafetensorsRows):
            t = src.full() if index is None else src.rows(index)
            if self.check_finite and not torch.isfinite(t).all():
                bad = (~torch.isfinite(t.float())).flatten(1).any(1).nonzero().squeeze(-1)
                feats = (bad if index is None else torch.from_numpy(np.asarray(index))[bad]).tolist()
                raise CLTFormatError(
                    f"{src.path}: decoder rows of feature(s) {feats[:8]} contain NaN or Inf values; "
                    "the checkpoint is corrupt -- re-download it"
                )
        else:
            t = src if index is None else src[torch.from_numpy(index)]
        return t.to(device=self.device, dtype=self.dtype or t.dtype)

    def rows(self, layer: int, features: torch.Tensor) -> torch.Tensor:
        """Decoder rows for ``features`` ``[U]`` (int) of source ``layer`` -> ``[U, n_out, D]``."""
        full = self._full[layer]
        if full is not None:
            return full[features.to(full.device)]
        src = self.sources[layer]
        if not isinstance(src, SafetensorsRows) and src.device == self.device and (self.dtype in (None, src.dtype)):
            return src[features.to(src.device)]
        idx = features.detach().cpu().to(torch.int64)
        if self.cache_rows <= 0 or (self.device_only_cache and self.device.type == "cpu"):
            uniq, inv = torch.unique(idx, return_inverse=True)  # sorted gather reads pages in order
            return self._load(layer, uniq.numpy())[inv.to(self.device)]
        return self._cached_rows(layer, idx)

    def _cached_rows(self, layer: int, idx: torch.Tensor) -> torch.Tensor:
        """Gather through a per-layer slot table: feature -> row of a device-resident block.

        Vectorised: one unique/lookup per call, one file read for the rows not cached yet.
        When the block is full it is reset (prompts in a sweep share features, so this is rare).
        """
        n_feat = self.sources[layer].shape[0]
        if layer not in self._slots:
            self._slots[layer] = torch.full((n_feat,), -1, dtype=torch.int64)
            self._blocks[layer] = None
            self._used[layer] = 0
        slots = self._slots[layer]
        missing = torch.unique(idx[slots[idx] < 0])
        if missing.numel():
            src = self.sources[layer]
            dtype = self.dtype or (src.torch_dtype if isinstance(src, SafetensorsRows) else src.dtype)
            row_bytes = int(np.prod(src.shape[1:])) * dtype.itemsize
            budget = self.cache_bytes // max(1, len(self.sources) * row_bytes)
            cap = max(min(self.cache_rows, n_feat, budget), int(missing.numel()))  # never below one call's rows
            if self._used[layer] + missing.numel() > cap:
                slots.fill_(-1)
                self._blocks[layer] = None
                self._used[layer] = 0
                missing = torch.unique(idx)
            loaded = self._load(layer, missing.numpy())
            block = self._blocks[layer]
            if block is None:
                block = torch.empty((cap, *loaded.shape[1:]), dtype=loaded.dtype, device=loaded.device)
                self._blocks[layer] = block
            start = self._used[layer]
            block[start : start + loaded.shape[0]] = loaded
            slots[missing] = torch.arange(start, start + loaded.shape[0])
            self._used[layer] = start + loaded.shape[0]
        block = self._blocks[layer]
        assert block is not None  # set above whenever a requested row was not resident
        return block[slots[idx].to(self.device)]
