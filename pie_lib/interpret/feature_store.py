"""Precomputed activation examples in the format the public CLT repositories ship (``features/``).

Layout (facts of the reference's ``HFFeatureStore`` and circuit-tracer's frontend)::

    features/index.json.gz      {"<layer>": {"filename": "<layer file>.bin", "offsets": [o_0, ..., o_F]}, ...}
    features/<layer file>.bin   records back to back

A record is a 4-byte little-endian length ``n`` and ``n`` bytes of compressed JSON (gzip, zlib or
raw deflate) holding at least ``examples_quantiles``, ``act_min`` and ``act_max`` -- the fields of
circuit-tracer's feature page. ``offsets[f]`` is where feature ``f``'s record starts
(``offsets[f + 1]`` where it ends, when given); a feature without a record has an empty range.
Features are named by ``cantor(layer, feature)``.

:class:`FeatureStore` reads one record per feature, from a local folder or a Hugging Face repo
(``repo_id[@revision]``) by HTTP range reads, caching the index and every record on disk.
:func:`write_feature_store` writes the format, so the toy world ships its own store.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Literal, Mapping, Protocol

import numpy as np

from pie_lib.clt.naming import cantor
from pie_lib.errors import DataFormatError, PieError

if TYPE_CHECKING:
    from pie_lib.clt.transcoder import CrossLayerTranscoder
    from pie_lib.models.loading import LoadedModel

log = logging.getLogger("pie_lib.interpret")

Compression = Literal["gzip", "zlib", "deflate"]
INDEX_NAME = "index.json.gz"
HEADER = struct.Struct("<I")  # 4-byte little-endian record length


class FeatureStoreError(DataFormatError):
    """A feature store is missing a feature, or its index or a record is unreadable."""


def _name(layer: int, feature: int) -> str:
    return f"feature {layer}/{feature} (cantor {cantor(layer, feature)})"


# --------------------------------------------------------------------------- bodies
def compress_body(obj: Mapping[str, Any], compression: Compression = "gzip") -> bytes:
    """JSON ``obj`` compressed as a record body."""
    raw = json.dumps(obj, separators=(",", ":")).encode("utf-8")
    if compression == "gzip":
        return gzip.compress(raw, mtime=0)
    if compression == "zlib":
        return zlib.compress(raw)
    if compression == "deflate":
        c = zlib.compressobj(wbits=-15)
        return c.compress(raw) + c.flush()
    raise ValueError(f"unknown compression {compression!r}; use gzip, zlib or deflate")


def decompress_body(body: bytes) -> bytes:
    """Inflate a gzip (magic 1f 8b), zlib (a valid 2-byte header) or raw-deflate body."""
    if body[:2] == b"\x1f\x8b":
        return gzip.decompress(body)
    if len(body) >= 2 and body[0] & 0x0F == 8 and (body[0] << 8 | body[1]) % 31 == 0:
        try:
            return zlib.decompress(body)
        except zlib.error:
            pass  # a raw-deflate stream can start with bytes that look like a zlib header
    return zlib.decompress(body, wbits=-15)


def encode_record(obj: Mapping[str, Any], compression: Compression = "gzip") -> bytes:
    body = compress_body(obj, compression)
    return HEADER.pack(len(body)) + body


# --------------------------------------------------------------------------- sources
class ByteSource(Protocol):
    """Where the store's files come from: whole small files, and byte ranges of big ones."""

    def read(self, name: str) -> bytes: ...

    def read_range(self, name: str, start: int, end: int) -> bytes: ...

    def describe(self) -> str: ...


class LocalSource:
    """A local ``features/`` folder (or a folder holding one)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def read(self, name: str) -> bytes:
        return (self.folder / name).read_bytes()

    def read_range(self, name: str, start: int, end: int) -> bytes:
        with open(self.folder / name, "rb") as fh:
            fh.seek(start)
            return fh.read(max(0, end - start))

    def describe(self) -> str:
        return str(self.folder)


class HubSource:
    """Files of a Hugging Face repo at a fixed revision, by HTTP range reads, cached on disk.

    Args:
        repo_id, revision: the repo and the *resolved* commit (so the cache never goes stale).
        prefix: folder of the store inside the repo (``features``).
        cache_dir: where the index and fetched records are kept.
        fs: an fsspec-like filesystem with ``cat_file(path, start=, end=)`` (default
            ``huggingface_hub.HfFileSystem()``); tests pass a local stand-in.
    """

    def __init__(self, repo_id: str, revision: str, prefix: str, cache_dir: Path, fs: Any = None) -> None:
        self.repo_id, self.revision, self.prefix = repo_id, revision, prefix.strip("/")
        self.cache = cache_dir / repo_id.replace("/", "--") / revision / self.prefix
        if fs is None:
            from huggingface_hub import HfFileSystem

            fs = HfFileSystem()
        self.fs = fs

    def _path(self, name: str) -> str:
        return (
            f"{self.repo_id}@{self.revision}/{self.prefix}/{name}"
            if self.prefix
            else f"{self.repo_id}@{self.revision}/{name}"
        )

    def _cached(self, key: str, fetch: Callable[[], bytes]) -> bytes:
        path = self.cache / key
        if path.exists():
            return path.read_bytes()
        data = fetch()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        return data

    def _fetch(self, name: str, start: int | None = None, end: int | None = None) -> bytes:
        try:
            return self.fs.cat_file(self._path(name), start=start, end=end)
        except FileNotFoundError:
            raise
        except Exception as exc:  # network / auth errors of the hub client: one line, with the fix
            raise FeatureStoreError(
                f"cannot read {self._path(name)} from the hub ({type(exc).__name__}: {' '.join(str(exc).split())[:160]}); "
                "connect (and `huggingface-cli login` for a gated repo), or pass a local --store folder"
            ) from None

    def read(self, name: str) -> bytes:
        return self._cached(name, lambda: self._fetch(name))

    def read_range(self, name: str, start: int, end: int) -> bytes:
        return self._cached(f"{name}.ranges/{start}-{end}", lambda: self._fetch(name, start, end))

    def describe(self) -> str:
        return f"{self.repo_id}@{self.revision}/{self.prefix}"


def default_store_for(clt: str | os.PathLike | CrossLayerTranscoder | None) -> str | os.PathLike:
    """Where ``--examples store`` looks without ``--store``: the toy world's own store for the toy
    CLT (``clt`` None), else the CLT's folder or hub id (the public CLT repos carry ``features/``)."""
    if clt is None or str(clt) in ("toy", "toy:llama"):
        from pie_lib.toy import toy_feature_store_path

        return toy_feature_store_path("llama")
    if str(clt).startswith("toy:"):
        raise FeatureStoreError(
            f"--examples store: the toy world ships a feature store for its llama CLT only, not {clt}; "
            "pass --store PATH, or --examples corpus"
        )
    if not isinstance(clt, (str, os.PathLike)):
        raise FeatureStoreError("--examples store with an in-memory CLT needs --store PATH_OR_HUB_ID")
    return clt


def default_cache_dir() -> Path:
    return Path(os.environ.get("PIE_FEATURE_STORE_CACHE", Path.home() / ".cache" / "pie_lib" / "feature_store"))


# --------------------------------------------------------------------------- reader
@dataclass
class LayerIndex:
    filename: str
    offsets: list[int]


class FeatureStore:
    """Read feature records (circuit-tracer feature pages) from a store.

    Use :meth:`open` with a local folder or a hub id; ``record(layer, feature)`` returns the decoded
    JSON; every problem is a one-line :class:`FeatureStoreError` naming the feature.
    """

    def __init__(self, source: ByteSource, provenance: dict[str, Any] | None = None) -> None:
        self.source = source
        self.provenance = provenance or {"store": source.describe()}
        self._index: dict[int, LayerIndex] | None = None

    @classmethod
    def open(
        cls,
        path_or_id: str | os.PathLike,
        cache_dir: str | os.PathLike | None = None,
        fs: Any = None,
        revision: str | None = None,
    ) -> "FeatureStore":
        """A local folder (holding ``index.json.gz``, or a ``features/`` folder that does), else a hub id
        ``owner/name[@revision]`` whose ``features/`` folder is read by range requests."""
        p = Path(path_or_id)
        if p.exists():
            folder = p if (p / INDEX_NAME).exists() else p / "features"
            if not (folder / INDEX_NAME).exists():
                raise FeatureStoreError(
                    f"--store {p}: no {INDEX_NAME} in it or in {p / 'features'}; "
                    "pass the folder of a feature store (see `pie_lib.interpret.feature_store`)"
                )
            from pie_lib.provenance import revision_from_snapshot

            # a folder inside the Hugging Face cache (a downloaded CLT repo) knows its commit
            return cls(
                LocalSource(folder), {"store": str(folder.resolve()), "revision": revision_from_snapshot(folder)}
            )
        text = str(path_or_id)
        repo, _, rev = text.partition("@")
        if repo.count("/") != 1 or repo.startswith((".", "/")):
            raise FeatureStoreError(
                f"--store {text}: neither an existing folder nor a hub id like owner/name[@revision]"
            )
        resolved = rev or revision
        if fs is None:
            from pie_lib.provenance import hub_revision

            resolved = hub_revision(repo, revision=resolved) if resolved is None or len(resolved) != 40 else resolved
            if resolved is None:
                raise FeatureStoreError(
                    f"--store {text}: cannot resolve the revision of {repo} (offline and not in the local cache?); "
                    "connect once, or pass a local folder"
                )
        resolved = resolved or "main"
        src = HubSource(repo, resolved, "features", Path(cache_dir) if cache_dir else default_cache_dir(), fs=fs)
        return cls(src, {"store": repo, "revision": resolved, "requested_revision": rev or revision})

    # ------------------------------------------------------------------ index
    def index(self) -> dict[int, LayerIndex]:
        if self._index is None:
            where = f"{self.source.describe()}/{INDEX_NAME}"
            try:
                raw = json.loads(decompress_body(self.source.read(INDEX_NAME)))
            except FileNotFoundError:
                raise FeatureStoreError(f"{where} does not exist; is this a feature store?") from None
            except (OSError, EOFError, zlib.error, ValueError) as exc:
                raise FeatureStoreError(
                    f"{where} is corrupt ({type(exc).__name__}: {' '.join(str(exc).split())[:160]}); re-download or rewrite the store"
                ) from None
            items = enumerate(raw) if isinstance(raw, list) else (raw.items() if isinstance(raw, dict) else None)
            if items is None:
                raise FeatureStoreError(f"{where} is corrupt: expected a map layer -> {{filename, offsets}}")
            out = {}
            for key, entry in items:
                try:
                    out[int(key)] = LayerIndex(str(entry["filename"]), [int(o) for o in entry["offsets"]])
                except (KeyError, TypeError, ValueError):
                    raise FeatureStoreError(
                        f"{where} is corrupt: layer {key!r} lacks a filename or integer offsets"
                    ) from None
            self._index = out
        return self._index

    def has(self, layer: int, feature: int) -> bool:
        ix = self.index().get(int(layer))
        return ix is not None and self._span(ix, feature) is not None

    @staticmethod
    def _span(ix: LayerIndex, feature: int) -> tuple[int, int | None] | None:
        if not 0 <= feature < len(ix.offsets):
            return None
        start = ix.offsets[feature]
        end = ix.offsets[feature + 1] if feature + 1 < len(ix.offsets) else None
        if start < 0 or (end is not None and end <= start):
            return None
        return start, end

    # ------------------------------------------------------------------ records
    def record(self, layer: int, feature: int) -> dict[str, Any]:
        """The decoded JSON record of one feature."""
        name = _name(layer, feature)
        ix = self.index().get(int(layer))
        if ix is None:
            raise FeatureStoreError(
                f"{name} is not in the store {self.source.describe()}: it has no layer {layer} "
                f"(layers {sorted(self.index())[:3]}...)"
            )
        span = self._span(ix, int(feature))
        if span is None:
            raise FeatureStoreError(
                f"{name} is missing from the store {self.source.describe()} (no record in {ix.filename}); "
                "use --examples corpus for features the store does not cover"
            )
        start, end = span
        try:
            head = (
                self.source.read_range(ix.filename, start, start + HEADER.size)
                if end is None
                else self.source.read_range(ix.filename, start, end)
            )
        except FileNotFoundError:
            raise FeatureStoreError(f"{name}: the store's {ix.filename} is missing") from None
        if len(head) < HEADER.size:
            raise FeatureStoreError(f"{name}: truncated record in {ix.filename} at byte {start} (no 4-byte length)")
        (n,) = HEADER.unpack_from(head)
        body = (
            head[HEADER.size : HEADER.size + n]
            if end is not None
            else self.source.read_range(ix.filename, start + HEADER.size, start + HEADER.size + n)
        )
        if len(body) < n:
            raise FeatureStoreError(
                f"{name}: truncated record in {ix.filename} at byte {start}: "
                f"{len(body)} of {n} bytes; re-download or rewrite the store"
            )
        try:
            obj = json.loads(decompress_body(body))
        except (OSError, EOFError, zlib.error, ValueError) as exc:
            raise FeatureStoreError(
                f"{name}: corrupt record in {ix.filename} at byte {start} ({type(exc).__name__})"
            ) from None
        missing = [k for k in ("examples_quantiles", "act_min", "act_max") if k not in obj]
        if missing or not isinstance(obj.get("examples_quantiles"), list):
            raise FeatureStoreError(f"{name}: record lacks {missing or ['examples_quantiles (a list)']}")
        return obj

    def records(self, keys: Iterable[tuple[int, int]]) -> dict[tuple[int, int], dict[str, Any]]:
        return {(int(l), int(f)): self.record(int(l), int(f)) for l, f in keys}


# --------------------------------------------------------------------------- writer
def write_feature_store(
    folder: str | os.PathLike,
    records: Mapping[tuple[int, int], Mapping[str, Any]],
    n_features: int | Mapping[int, int],
    compression: Compression = "gzip",
    filename: Callable[[int], str] = lambda l: f"layer_{l}.bin",
) -> Path:
    """Write records in the store format; returns the ``features/`` folder written.

    Args:
        folder: the store's root; files go to ``folder/features/``.
        records: ``(layer, feature) -> JSON record`` (at least examples_quantiles, act_min, act_max).
        n_features: features per layer (offsets hold ``F + 1`` entries; absent features get an
            empty range).
    """
    out = Path(folder) / "features"
    out.mkdir(parents=True, exist_ok=True)
    layers = sorted({l for l, _ in records})
    index: dict[str, dict[str, Any]] = {}
    for layer in layers:
        F = n_features if isinstance(n_features, int) else int(n_features[layer])
        blobs = {f: encode_record(r, compression) for (l, f), r in records.items() if l == layer}
        bad = [f for f in blobs if not 0 <= f < F]
        if bad:
            raise PieError(f"features {bad[:5]} of layer {layer} are outside 0..{F - 1}")
        sizes = np.zeros(F, dtype=np.int64)
        for f, b in blobs.items():
            sizes[f] = len(b)
        offsets = np.concatenate([[0], np.cumsum(sizes)]).tolist()
        name = filename(layer)
        tmp = out / f".{name}.tmp"
        with open(tmp, "wb") as fh:
            for f in sorted(blobs):
                fh.write(blobs[f])
        os.replace(tmp, out / name)
        index[str(layer)] = {"filename": name, "offsets": offsets}
    tmp = out / f".{INDEX_NAME}.tmp"
    tmp.write_bytes(gzip.compress(json.dumps(index).encode(), mtime=0))
    os.replace(tmp, out / INDEX_NAME)
    return out


# --------------------------------------------------------------------------- from Stage II's examples
N_HIST_BINS = 20


def _window(acts: np.ndarray, peak: int, width: int | None) -> slice:
    if width is None or acts.size <= width:
        return slice(0, acts.size)
    lo = min(max(0, peak - width // 2), acts.size - width)
    return slice(lo, lo + width)


def record_from_examples(
    fx: Any, active_acts: np.ndarray | None, frequency: float | None = None, window: int | None = None
) -> dict[str, Any]:
    """A store record (the example part of a feature page) from Stage II's ``FeatureExamples``.

    Args:
        fx: :class:`~pie_lib.interpret.examples.FeatureExamples` of one feature.
        active_acts: the feature's activation on its active corpus contexts (all of them, or a
            uniform sample of them: :meth:`ActivationStore.active_acts`) for ``quantile_values``
            (activation at each percentile of the active contexts) and the histogram (counts of
            the values given); None when unknown.
        frequency: share of contexts where the feature is active (default ``fx.density``).
        window: keep this many tokens around each example's peak token (None: the whole context).
    Returns:
        ``{examples_quantiles, act_min, act_max, quantile_values, histogram, activation_frequency}``.
    """
    groups: dict[str, list[dict]] = {"Top activations": [], "Quantile samples": []}
    all_acts = [np.zeros(0)]
    for e in fx.examples:
        # each token carries the whitespace before it, so the tokens joined give the context's text back
        cuts = [e.starts[0] if len(e.starts) else 0] + list(e.ends)
        toks = [e.text[a:b] for a, b in zip(cuts[:-1], cuts[1:])]
        acts = np.asarray(e.token_acts, dtype=np.float64)[: len(toks)]
        peak = int(np.abs(acts).argmax()) if acts.size else 0
        w = _window(acts, peak, window)
        all_acts.append(acts)
        groups["Top activations" if e.kind == "top" else "Quantile samples"].append(
            {
                "tokens": toks[w],
                "tokens_acts_list": [float(a) for a in acts[w]],
                "train_token_ind": peak - (w.start or 0),
                "is_repeated_datapoint": False,
            }
        )
    cat = np.concatenate(all_acts)
    act_min = float(min(cat.min(), 0.0)) if cat.size else 0.0
    act_max = float(max(cat.max(), fx.max_act)) if cat.size else float(fx.max_act)
    freq = float(fx.density) if frequency is None else float(frequency)
    if active_acts is not None and len(active_acts):
        active = np.asarray(active_acts, dtype=np.float64)
        qv = np.quantile(active, np.arange(1, 101) / 100).tolist()
        hi = act_max if act_max > act_min else act_min + 1.0
        hist = np.histogram(np.clip(active, act_min, hi), bins=N_HIST_BINS, range=(act_min, hi))[0].tolist()
    else:
        qv, hist = [], []
    return {
        "examples_quantiles": [{"quantile_name": k, "examples": v} for k, v in groups.items() if v],
        "act_min": act_min,
        "act_max": act_max,
        "quantile_values": [float(x) for x in qv],
        "histogram": [float(x) for x in hist],
        "activation_frequency": freq,
    }


def store_from_corpus(
    model: LoadedModel,
    clt: CrossLayerTranscoder,
    out: str | os.PathLike,
    corpus: Any = None,
    n_top: int = 8,
    n_quantile_bins: int = 2,
    n_per_quantile: int = 2,
    window: int | None = 16,
    features: Iterable[tuple[int, int]] | None = None,
    compression: Compression = "gzip",
    work_dir: str | os.PathLike | None = None,
    progress: bool = False,
) -> Path:
    """Stream a corpus (Stage II's :class:`~pie_lib.interpret.examples.ActivationStore`) and write
    the examples of ``features`` (default: every feature of the CLT) as a feature store under ``out``."""
    import tempfile

    from pie_lib.interpret.corpus import CorpusConfig
    from pie_lib.interpret.examples import ActivationStore, ExampleConfig

    keys = (
        sorted(features)
        if features is not None
        else [(l, f) for l in range(clt.n_layers) for f in range(clt.n_features)]
    )
    ccfg = corpus if isinstance(corpus, CorpusConfig) else CorpusConfig(**({"source": corpus} if corpus else {}))
    ecfg = ExampleConfig(n_top=n_top, n_quantile_bins=n_quantile_bins, n_per_quantile=n_per_quantile)
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        acts = ActivationStore.build(
            model,
            clt,
            keys,
            Path(tmp) / "examples",
            ccfg,
            ecfg,
            {"model": str(getattr(model, "name", "")), "clt": "in-memory"},
            progress,
        )
        examples = acts.select_examples(keys, ecfg)
        stats = acts.feature_stats(keys)
        covered = set(zip(examples["layer"].astype(int), examples["feature"].astype(int)))
        records = {}
        for key in keys:
            if key in covered:
                fx = acts.feature_examples(examples, *key, stats=stats)
                records[key] = record_from_examples(fx, acts.active_acts(*key)[0], fx.density, window)
    return write_feature_store(out, records, clt.n_features, compression)


# --------------------------------------------------------------------------- to Stage II's examples
def record_examples(record: Mapping[str, Any], layer: int, feature: int) -> Any:
    """A store record as Stage II's :class:`~pie_lib.interpret.examples.FeatureExamples`.

    The first quantile group are the top examples (kind "top"), the others "quantile"; a context's
    text is its tokens joined, with each token's character span.
    """
    from pie_lib.interpret.examples import Example, FeatureExamples

    out = []
    ctx = 0
    for qi, q in enumerate(record["examples_quantiles"]):
        for ex in q.get("examples", []):
            toks = [str(t) for t in ex["tokens"]]
            acts = np.asarray(ex["tokens_acts_list"], dtype=np.float32)
            if acts.shape[0] != len(toks):
                raise FeatureStoreError(
                    f"{_name(layer, feature)}: an example has {len(toks)} tokens but {acts.shape[0]} activations"
                )
            ends = np.cumsum([len(t) for t in toks]).tolist()
            starts = [e - len(t) for e, t in zip(ends, toks)]
            peak = float(acts[int(np.abs(acts).argmax())]) if acts.size else 0.0
            out.append(Example(ctx, "top" if qi == 0 else "quantile", peak, "".join(toks), starts, ends, acts))
            ctx += 1
    # n_active / n_contexts count the examples shown; the store's own frequency is in record_stats
    return FeatureExamples(layer, feature, float(record["act_max"]), len(out), len(out), out)


def record_stats(record: Mapping[str, Any]) -> dict[str, float]:
    """Stage II's per-feature statistics from a record: max_act, n_active (examples), density
    (the store's ``activation_frequency``; NaN when the record does not carry it)."""
    n = sum(len(q.get("examples", [])) for q in record["examples_quantiles"])
    freq = record.get("activation_frequency")
    return {
        "max_act": float(record["act_max"]),
        "n_active": int(n),
        "density": float(freq) if freq is not None else float("nan"),
    }


class StoreExamples:
    """Stage II's examples of some features, read from a feature store instead of a corpus.

    All records are read (and checked) when it is made, so a missing feature stops the run before
    anything is written.
    """

    def __init__(self, store: FeatureStore, keys: Iterable[tuple[int, int]]) -> None:
        self.store = store
        self.records = store.records(keys)

    def feature_stats(self, keys: Iterable[tuple[int, int]]) -> Any:
        import pandas as pd

        rows = [{"layer": l, "feature": f, **record_stats(self.records[(l, f)])} for l, f in keys]
        return pd.DataFrame(rows, columns=["layer", "feature", "max_act", "n_active", "density"])

    def feature_examples(self, layer: int, feature: int) -> Any:
        return record_examples(self.records[(layer, feature)], layer, feature)


def build_toy_store(arch: str = "llama") -> Path:
    """Rebuild the toy world's shipped store (``python -m pie_lib.interpret.feature_store``; ~10 CPU-min)."""
    from pie_lib.interpret.corpus import CorpusConfig
    from pie_lib.toy import toy_feature_store_path
    from pie_lib.world import load_world

    world = load_world(f"toy:{arch}", f"toy:{arch}", device="cpu")
    return store_from_corpus(
        world.model,
        world.clt,
        toy_feature_store_path(arch),
        corpus=CorpusConfig(source="toy", n_docs=600),
        progress=True,
    )


if __name__ == "__main__":  # pragma: no cover - a build step
    import sys

    print(build_toy_store(sys.argv[1] if len(sys.argv) > 1 else "llama"))
