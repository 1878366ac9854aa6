"""Activation examples: stream a corpus through model + CLT, keep what each feature fires on.

Stage 1 (:meth:`ActivationStore.build`): the corpus is cut into contexts (``contexts.parquet``),
then batch after batch goes through one :func:`~pie_lib.engine.traces.run_with_cache` and, per
source layer, one :func:`encode_features` restricted to the requested features (their encoder
rows gathered; no loop over features). Only nonzero activations are written, one parquet part
per batch (``rounds/<id>/part-<batch>.parquet``: layer, feature, ctx, pos, act). A part is
written atomically, so a rerun skips finished batches; features already collected in an earlier
run are not recomputed (a new *round* covers only the new ones). Position 0 (BOS) and padding
are excluded.

Stage 2 (:meth:`ActivationStore.select_examples`): per feature, the activation of a context is
the value at its token of largest ``|activation|``; the ``n_top`` contexts with the largest
``|activation|`` are the top examples, and ``n_per_quantile`` contexts are sampled from each of
``n_quantile_bins`` activation-quantile bins of the remaining active contexts. Written to
``examples.parquet`` with the nonzero token activations of every example.

Streaming mode (``ExampleConfig(store="stream")``, ``pie interpret --examples-store stream``): instead of
every nonzero activation, :class:`StreamingExamples` keeps per feature a running top-N and a
uniform reservoir of its active contexts (bottom-R by a seeded hash of (feature, context), so the
sample does not depend on batching), with their token activations, the active-context count and
nothing else. Memory and disk are ``O(features x (N + R) x ctx_len)`` whatever the corpus size or
feature density; a checkpoint every few batches makes it resumable. Top examples are the same as
in records mode; quantile examples are drawn from the reservoir (quantile bins estimated from it).
``dense_acts`` needs every context's activation, so it is only available in records mode.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence, cast

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from pie_lib.errors import DataFormatError
from pie_lib.interpret.corpus import CorpusConfig, iter_documents, make_contexts
from pie_lib.store import check_same_config, read_config, write_atomic, write_json, write_parquet

if TYPE_CHECKING:
    from pie_lib.clt.transcoder import CrossLayerTranscoder
    from pie_lib.models.loading import LoadedModel

log = logging.getLogger("pie_lib.interpret")

FeatureKey = tuple[int, int]  # (layer, feature)


@dataclass
class ExampleConfig:
    """How activation examples are collected and chosen.

    Attributes:
        batch_size: contexts per forward.
        n_top: top-activating contexts kept per feature.
        n_quantile_bins, n_per_quantile: quantile-sampled contexts (below the top ones).
        seed: seed of the quantile sampling (and of the streaming reservoir's hash).
        store: "records" (every nonzero activation on disk) or "stream" (running top-N + reservoir).
        reservoir: reservoir contexts per feature in stream mode (0 = 4 x bins x per-bin samples).
        checkpoint_every: stream mode writes its state every this many batches (resume point).
    """

    batch_size: int = 32
    n_top: int = 40
    n_quantile_bins: int = 4
    n_per_quantile: int = 5
    seed: int = 0
    store: str = "records"
    reservoir: int = 0
    checkpoint_every: int = 50

    def reservoir_size(self) -> int:
        """Contexts kept per feature for quantile sampling (default 4 x bins x per-bin samples)."""
        return self.reservoir or 4 * max(1, self.n_quantile_bins) * max(1, self.n_per_quantile)


# --------------------------------------------------------------------------- encoding
def encode_features(clt: CrossLayerTranscoder, x: torch.Tensor, layer: int, features: torch.Tensor) -> torch.Tensor:
    """Activations of only ``features`` of source ``layer``.

    Gathers the encoder rows of those features and applies the CLT's activation (JumpReLU with
    their thresholds, or ReLU). A TopK CLT needs every pre-activation, so it encodes all
    features and gathers.

    Args:
        x: ``[..., D]`` residual stream at ``layer`` (hook_resid_mid).
        features: ``[U]`` feature indices.
    Returns:
        ``[..., U]`` activations.
    """
    features = features.to(clt.W_enc.device)
    if clt.threshold is None and getattr(clt.config, "activation", "relu") == "topk" and clt.config.k:
        return clt.encode(x.to(clt.device), layer=layer)[..., features]
    W = clt.W_enc[layer].index_select(0, features)  # [U, D]
    pre = x.to(device=W.device, dtype=W.dtype) @ W.T + clt.b_enc[layer].index_select(0, features)
    if clt.threshold is not None:
        return pre * (pre > clt.threshold[layer].index_select(0, features))
    return torch.relu(pre)


def pad_batch(token_lists: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad ``token_lists`` -> (ids ``[B, T]``, valid ``[B, T]`` bool without position 0).

    Right padding is safe without an attention mask: under causal attention, padding at the end
    cannot influence earlier positions.
    """
    T = max(len(t) for t in token_lists)
    ids = torch.full((len(token_lists), T), int(pad_id), dtype=torch.long)
    valid = torch.zeros((len(token_lists), T), dtype=torch.bool)
    for i, t in enumerate(token_lists):
        ids[i, : len(t)] = torch.as_tensor(list(t), dtype=torch.long)
        valid[i, 1 : len(t)] = True  # position 0 (BOS) is excluded (spec §1)
    return ids, valid


def pad_id_of(tokenizer: Any) -> int:
    for attr in ("pad_token_id", "eos_token_id", "unk_token_id"):
        v = getattr(tokenizer, attr, None)
        if v is not None:
            return int(v)
    return 0


def features_by_layer(features: Sequence[FeatureKey]) -> dict[int, torch.Tensor]:
    """``{layer: LongTensor of feature indices}`` for a list of (layer, feature) pairs."""
    out: dict[int, list[int]] = {}
    for layer, f in features:
        out.setdefault(int(layer), []).append(int(f))
    return {l: torch.tensor(sorted(set(fs)), dtype=torch.long) for l, fs in sorted(out.items())}


def sparse_activations(
    model: LoadedModel,
    clt: CrossLayerTranscoder,
    token_lists: Sequence[Sequence[int]],
    by_layer: dict[int, torch.Tensor],
    pad_id: int,
) -> pd.DataFrame:
    """Nonzero activations of the given features on a batch of contexts.

    One ``run_with_cache`` for the batch, one :func:`encode_features` per source layer.

    Returns:
        Columns layer, feature, row (index in ``token_lists``), pos, act.
    """
    from pie_lib.engine.traces import run_with_cache

    ids, valid = pad_batch(token_lists, pad_id)
    cache = run_with_cache(model, ids)
    frames = []
    for layer, feats in by_layer.items():
        acts = encode_features(clt, cache.resid_mid[layer], layer, feats)  # [B, T, U]
        acts = acts * valid.to(acts.device)[..., None]
        nz = acts.nonzero()  # [n, 3]: (row, pos, u)
        if nz.numel() == 0:
            continue
        vals = acts[nz[:, 0], nz[:, 1], nz[:, 2]].float().cpu().numpy()
        nz = nz.cpu().numpy()
        frames.append(
            pd.DataFrame(
                {
                    "layer": np.full(len(vals), layer, dtype=np.int32),
                    "feature": feats.numpy()[nz[:, 2]].astype(np.int32),
                    "row": nz[:, 0].astype(np.int64),
                    "pos": nz[:, 1].astype(np.int32),
                    "act": vals.astype(np.float32),
                }
            )
        )
    if not frames:
        return pd.DataFrame(
            {
                c: pd.Series(dtype=t)
                for c, t in (
                    ("layer", "int32"),
                    ("feature", "int32"),
                    ("row", "int64"),
                    ("pos", "int32"),
                    ("act", "float32"),
                )
            }
        )
    return pd.concat(frames, ignore_index=True)


# --------------------------------------------------------------------------- files
def _round_id(features: Sequence[FeatureKey]) -> str:
    return hashlib.sha256(json.dumps(sorted(map(list, features))).encode()).hexdigest()[:12]


# --------------------------------------------------------------------------- views
@dataclass
class Example:
    """One context shown for a feature.

    Attributes:
        kind: "top" or "quantile".
        act: the context's activation (value at its token of largest |activation|).
        token_acts: ``[T]`` activation at every token of the context (zeros where inactive).
    """

    ctx_id: int
    kind: str
    act: float
    text: str
    starts: list[int]
    ends: list[int]
    token_acts: np.ndarray


@dataclass
class FeatureExamples:
    """A feature's examples and activation statistics over the corpus."""

    layer: int
    feature: int
    max_act: float
    n_active: int
    n_contexts: int
    examples: list[Example] = field(default_factory=list)

    @property
    def density(self) -> float:
        return self.n_active / max(self.n_contexts, 1)


# --------------------------------------------------------------------------- the store
class ActivationStore:
    """Sparse activations of some features over a corpus, on disk under ``root``.

    Use :meth:`build` to create or extend one; the constructor opens an existing one.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        mpath = self.root / "manifest.json"
        if not mpath.exists():
            raise DataFormatError(
                f"{self.root} holds no activation store (manifest.json missing); run `pie interpret` first"
            )
        self.manifest = json.loads(mpath.read_text())
        self._contexts: pd.DataFrame | None = None
        self._records: pd.DataFrame | None = None
        self._ctx_table: pd.DataFrame | None = None
        self._ct_groups: dict | None = None  # (layer, feature) -> row indices of context_table()
        self._rec_groups: dict | None = None  # (layer, feature) -> row indices of records()
        self._stream_cache: list[StreamingExamples] | None = None

    # ---------------------------------------------------------------- building
    @classmethod
    def build(
        cls,
        model: LoadedModel,
        clt: CrossLayerTranscoder,
        features: Iterable[FeatureKey],
        root: str | os.PathLike,
        corpus: CorpusConfig | None = None,
        cfg: ExampleConfig | None = None,
        identity: dict[str, Any] | None = None,
        progress: bool = True,
    ) -> "ActivationStore":
        """Collect (or finish collecting) the activations of ``features`` over ``corpus``.

        Args:
            model: a :class:`~pie_lib.models.loading.LoadedModel`; clt: its CLT.
            features: (layer, feature) pairs.
            root: the store's folder (created if needed).
            identity: what produced it (model / CLT names); a rerun with a different identity or
                corpus raises ``ConfigMismatchError`` instead of mixing results.
        Returns:
            The store, covering at least ``features``.
        """
        corpus = corpus or CorpusConfig()
        cfg = cfg or ExampleConfig()
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        if cfg.store not in ("records", "stream"):
            raise DataFormatError(f"example store {cfg.store!r}: use 'records' or 'stream'")
        manifest = {"version": 1, "identity": identity or {}, "corpus": asdict(corpus), "store": cfg.store}
        mpath = root / "manifest.json"
        old = read_config(mpath, "activation store")
        if old is not None:
            check_same_config(
                old,
                manifest,
                f"{root} holds activations from another model / CLT / corpus ({old.get('identity')}, "
                f"{old.get('corpus', {}).get('source')}; differs in {{keys}}); pass a fresh --out folder or delete this one",
                keys=("identity", "corpus"),
            )
            check_same_config(
                {"store": old.get("store", "records")},
                {"store": cfg.store},
                f"{root} is a {old.get('store', 'records')!r} example store, not {cfg.store!r}; pass the same "
                "--examples-store or a fresh --out folder",
            )
            manifest = {**old, "store": cfg.store}
        ctx_path = root / "contexts.parquet"
        if not ctx_path.exists():
            docs = list(iter_documents(corpus))
            if not docs:
                raise DataFormatError(f"corpus {corpus.source!r} yielded no documents")
            ctxs = make_contexts(model.tokenizer, docs, corpus)
            write_parquet(pd.DataFrame([asdict(c) for c in ctxs]), ctx_path)
            manifest["n_contexts"] = len(ctxs)
        write_json(manifest, mpath, indent=1, default=str)
        store = cls(root)
        store._extend(model, clt, [(int(l), int(f)) for l, f in features], cfg, progress)
        return store

    def _rounds(self) -> list[dict]:
        out = []
        for p in sorted((self.root / "rounds").glob("*/features.json")):
            r = json.loads(p.read_text())
            r["dir"] = p.parent
            out.append(r)
        return out

    @property
    def is_stream(self) -> bool:
        return self.manifest.get("store", "records") == "stream"

    def _records_only(self, what: str) -> None:
        if self.is_stream:
            raise DataFormatError(
                f"{self.root} is a streaming example store (top-N + reservoir per feature): {what} needs every "
                "nonzero activation; rebuild it with `pie interpret --examples-store records`"
            )

    def _streams(self) -> list[StreamingExamples]:
        if self._stream_cache is None:
            self._stream_cache = [
                StreamingExamples.load(r["dir"] / "stream.npz")
                for r in self._rounds()
                if (r["dir"] / "stream.npz").exists()
            ]
        return self._stream_cache

    def _stream_of(self, layer: int, feature: int) -> StreamingExamples | None:
        return next((st for st in self._streams() if (layer, feature) in st.index), None)

    def _extend_stream(
        self,
        model: LoadedModel,
        clt: CrossLayerTranscoder,
        features: list[FeatureKey],
        cfg: ExampleConfig,
        progress: bool,
    ) -> None:
        """Stream the corpus once per round of new features, folding each batch into the running state."""
        covered = {tuple(f) for r in self._rounds() for f in r["features"]}
        missing = sorted(set(features) - covered)
        if missing:
            rdir = self.root / "rounds" / _round_id(missing)
            write_json(
                {
                    "features": [list(f) for f in missing],
                    "batch_size": cfg.batch_size,
                    "n_top": cfg.n_top,
                    "reservoir": cfg.reservoir_size(),
                    "seed": cfg.seed,
                },
                rdir / "features.json",
                indent=1,
                default=str,
            )
        contexts = self.contexts
        tokens = contexts["token_ids"].tolist()
        ctx_ids = torch.tensor(contexts["ctx_id"].to_numpy(), dtype=torch.long)
        ctx_len = max((len(t) for t in tokens), default=1)
        pad = pad_id_of(model.tokenizer)
        requested = set(features)
        for r in self._rounds():
            feats = [tuple(f) for f in r["features"]]
            if not requested.intersection(feats):
                continue
            path = r["dir"] / "stream.npz"
            st = (
                StreamingExamples.load(path)
                if path.exists()
                else StreamingExamples(
                    feats,
                    int(r.get("n_top", cfg.n_top)),
                    int(r.get("reservoir", cfg.reservoir_size())),
                    ctx_len,
                    int(r.get("seed", cfg.seed)),
                )
            )
            bs = int(r["batch_size"])
            n_batches = math.ceil(len(tokens) / bs)
            if st.next_batch >= n_batches:
                continue
            by_layer = features_by_layer(feats)
            todo = range(st.next_batch, n_batches)
            for b in tqdm(
                todo, desc=f"activations, streaming ({len(feats)} features)", disable=not progress, unit="batch"
            ):
                lo = b * bs
                for layer, fl, acts in batch_activations(model, clt, tokens[lo : lo + bs], by_layer, pad):
                    st.update(layer, fl.cpu(), acts, ctx_ids[lo : lo + bs])
                st.next_batch = b + 1
                if st.next_batch % max(1, cfg.checkpoint_every) == 0 or st.next_batch == n_batches:
                    st.save(path)  # resume point: a rerun continues after the last saved batch
        self._stream_cache = None

    def _extend(
        self,
        model: LoadedModel,
        clt: CrossLayerTranscoder,
        features: list[FeatureKey],
        cfg: ExampleConfig,
        progress: bool,
    ) -> None:
        if self.is_stream:
            return self._extend_stream(model, clt, features, cfg, progress)
        requested = set(features)
        rounds = self._rounds()
        covered = {tuple(f) for r in rounds for f in r["features"]}
        missing = sorted(requested - covered)
        if missing:
            rid = _round_id(missing)
            rdir = self.root / "rounds" / rid
            write_json(
                {"features": [list(f) for f in missing], "batch_size": cfg.batch_size},
                rdir / "features.json",
                indent=1,
                default=str,
            )
            rounds = self._rounds()
        contexts = self.contexts
        tokens = contexts["token_ids"].tolist()
        pad = pad_id_of(model.tokenizer)
        for r in rounds:
            feats = [tuple(f) for f in r["features"]]
            if not requested.intersection(feats):
                continue
            bs = int(r["batch_size"])
            n_batches = math.ceil(len(tokens) / bs)
            todo = [b for b in range(n_batches) if not (r["dir"] / f"part-{b:06d}.parquet").exists()]
            if not todo:
                continue
            by_layer = features_by_layer(feats)
            for b in tqdm(todo, desc=f"activations ({len(feats)} features)", disable=not progress, unit="batch"):
                lo = b * bs
                df = sparse_activations(model, clt, tokens[lo : lo + bs], by_layer, pad)
                df["ctx"] = contexts["ctx_id"].to_numpy()[lo + df.pop("row").to_numpy()]
                write_parquet(
                    cast(pd.DataFrame, df[["layer", "feature", "ctx", "pos", "act"]]),
                    r["dir"] / f"part-{b:06d}.parquet",
                )
        self._records = self._ctx_table = self._ct_groups = self._rec_groups = None

    # ---------------------------------------------------------------- reading
    @property
    def contexts(self) -> pd.DataFrame:
        """One row per context: ctx_id, doc_id, token_ids, text, starts, ends (index = position)."""
        if self._contexts is None:
            self._contexts = pd.read_parquet(self.root / "contexts.parquet")
        return self._contexts

    @property
    def n_contexts(self) -> int:
        return len(self.contexts)

    def covered_features(self) -> set[FeatureKey]:
        return {tuple(f) for r in self._rounds() for f in r["features"]}  # type: ignore[misc]

    def records(self) -> pd.DataFrame:
        """All stored nonzero activations: layer, feature, ctx, pos, act (records mode only)."""
        self._records_only("records()")
        if self._records is None:
            parts = [p for r in self._rounds() for p in sorted(r["dir"].glob("part-*.parquet"))]
            self._records = (
                pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True)
                if parts
                else pd.DataFrame({"layer": [], "feature": [], "ctx": [], "pos": [], "act": []})
            )
        return self._records

    def context_table(self) -> pd.DataFrame:
        """Per (layer, feature, ctx) with any nonzero activation: the activation at the token of
        largest |activation| (``act``) and that token's position (``pos``)."""
        self._records_only("context_table()")
        if self._ctx_table is None:
            rec = self.records()
            if len(rec) == 0:
                self._ctx_table = rec.assign(abs=[])
            else:
                rec = rec.assign(abs=rec["act"].abs())
                rec = rec.sort_values(
                    ["layer", "feature", "ctx", "abs"], ascending=[True, True, True, False], kind="stable"
                )
                self._ctx_table = rec.drop_duplicates(["layer", "feature", "ctx"], keep="first").reset_index(drop=True)
        return self._ctx_table

    def feature_stats(self, features: Iterable[FeatureKey] | None = None) -> pd.DataFrame:
        """Per feature: max_act (signed, at the largest |activation|), n_active contexts, density."""
        if self.is_stream:
            want = sorted(set(features) if features is not None else self.covered_features())
            frames = [st.stats(self.n_contexts) for st in self._streams()]
            have = (
                pd.concat(frames, ignore_index=True)
                if frames
                else pd.DataFrame(columns=["layer", "feature", "max_act", "n_active", "density"])
            )
            keys = pd.DataFrame(want, columns=["layer", "feature"]).merge(
                have.drop(columns=["density"]), how="left", on=["layer", "feature"]
            )
            keys["max_act"] = keys["max_act"].fillna(0.0).astype(float)
            keys["n_active"] = keys["n_active"].fillna(0).astype(int)
            keys["density"] = keys["n_active"] / max(self.n_contexts, 1)
            return keys
        ct = self.context_table()
        keys = pd.DataFrame(
            sorted(set(features) if features is not None else self.covered_features()), columns=["layer", "feature"]
        )
        if len(ct):
            idx = ct.groupby(["layer", "feature"])["abs"].idxmax()
            best = ct.loc[idx, ["layer", "feature", "act"]].rename(columns={"act": "max_act"})
            n = cast(pd.Series, ct.groupby(["layer", "feature"]).size()).rename("n_active").reset_index()
            keys = keys.merge(best, how="left", on=["layer", "feature"]).merge(n, how="left", on=["layer", "feature"])
        else:
            keys = keys.assign(max_act=np.nan, n_active=0)
        keys["max_act"] = keys["max_act"].fillna(0.0).astype(float)
        keys["n_active"] = keys["n_active"].fillna(0).astype(int)
        keys["density"] = keys["n_active"] / max(self.n_contexts, 1)
        return keys

    def dense_acts(self, layer: int, feature: int) -> np.ndarray:
        """``[N]`` activation of every context (zeros for contexts where the feature is silent)."""
        self._records_only("dense_acts() (every context's activation, e.g. for pie evaluate)")
        ct = self.context_table()
        rows = self._group_rows("ct", layer, feature)
        out = np.zeros(self.n_contexts, dtype=np.float64)
        out[self._ctx_positions(ct["ctx"].to_numpy()[rows])] = ct["act"].to_numpy()[rows]
        return out

    def _group_rows(self, which: str, layer: int, feature: int) -> np.ndarray:
        """Row indices of one feature in context_table() ("ct") or records() ("rec"), via a
        groupby index built once (a per-feature boolean filter would cost O(rows) per feature)."""
        if which == "ct":
            if self._ct_groups is None:
                ct = self.context_table()
                self._ct_groups = ct.groupby(["layer", "feature"]).indices if len(ct) else {}
            groups = self._ct_groups
        else:
            if self._rec_groups is None:
                rec = self.records()
                self._rec_groups = rec.groupby(["layer", "feature"]).indices if len(rec) else {}
            groups = self._rec_groups
        return groups.get((layer, feature), np.zeros(0, dtype=np.int64))

    def _ctx_positions(self, ctx_ids: np.ndarray) -> np.ndarray:
        ids = self.contexts["ctx_id"].to_numpy()
        if len(ids) and ids[0] == 0 and ids[-1] == len(ids) - 1:
            return ctx_ids.astype(np.int64)  # ctx ids are positions (the usual case)
        return pd.Index(ids).get_indexer(ctx_ids)

    def token_acts(self, layer: int, feature: int, ctx_ids: Sequence[int]) -> list[np.ndarray]:
        """Dense ``[T]`` token activations for each context in ``ctx_ids``."""
        if self.is_stream:
            st = self._stream_of(layer, feature)
            got = st.token_acts(layer, feature, ctx_ids) if st is not None else None
            if got is None:
                raise DataFormatError(
                    f"streaming store {self.root}: feature ({layer}, {feature}) keeps token activations only for "
                    "its top and reservoir contexts"
                )
            lens = self.contexts["token_ids"].map(len).to_numpy()[self._ctx_positions(np.asarray(ctx_ids))]
            return [g[: int(n)].astype(np.float32) for g, n in zip(got, lens)]
        rec = self.records().iloc[self._group_rows("rec", layer, feature)]
        sel = rec[rec["ctx"].isin(list(ctx_ids))]
        lens = self.contexts["token_ids"].map(len).to_numpy()[self._ctx_positions(np.asarray(ctx_ids))]
        out = [np.zeros(int(n), dtype=np.float32) for n in lens]
        where = {int(c): i for i, c in enumerate(ctx_ids)}
        for c, p, a in zip(sel["ctx"].to_numpy(), sel["pos"].to_numpy(), sel["act"].to_numpy()):
            out[where[int(c)]][int(p)] = a
        return out

    # ---------------------------------------------------------------- selection
    def select_examples(self, features: Iterable[FeatureKey], cfg: ExampleConfig | None = None) -> pd.DataFrame:
        """Top and quantile-sampled examples of ``features`` (module docstring, stage 2).

        Returns:
            One row per example: layer, feature, kind ("top"/"quantile"), rank, ctx, act, pos,
            nz_pos, nz_act (the example's nonzero token activations).
        """
        cfg = cfg or ExampleConfig()
        keys = pd.DataFrame(sorted(set(features)), columns=["layer", "feature"])
        if self.is_stream:
            cols = ["layer", "feature", "kind", "rank", "ctx", "act", "pos", "nz_pos", "nz_act"]
            frames = [st.examples(cfg) for st in self._streams()]
            ex = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
            if len(ex) == 0:
                return pd.DataFrame({c: [] for c in cols})
            return ex.merge(keys, on=["layer", "feature"]).reset_index(drop=True)
        ct = self.context_table().merge(keys, on=["layer", "feature"])
        cols = ["layer", "feature", "kind", "rank", "ctx", "act", "pos", "nz_pos", "nz_act"]
        if len(ct) == 0:
            return pd.DataFrame({c: [] for c in cols})
        ct = ct.sort_values(["layer", "feature", "abs", "ctx"], ascending=[True, True, False, True], kind="stable")
        g = ct.groupby(["layer", "feature"], sort=False)
        ct["rank"] = g.cumcount()
        ct["n_active"] = g["ctx"].transform("size")
        top = ct[ct["rank"] < cfg.n_top].assign(kind="top")
        rest = ct[ct["rank"] >= cfg.n_top].copy()
        parts = [top]
        if len(rest) and cfg.n_quantile_bins > 0 and cfg.n_per_quantile > 0:
            # quantile bin by rank among all active contexts (0 = strongest), then a seeded shuffle
            rest["qbin"] = (rest["rank"] * cfg.n_quantile_bins // rest["n_active"]).astype(int)
            rest["shuffle"] = np.random.default_rng(cfg.seed).random(len(rest))
            rest = rest.sort_values(["layer", "feature", "qbin", "shuffle"], kind="stable")
            q = rest.groupby(["layer", "feature", "qbin"], sort=False).head(cfg.n_per_quantile)
            parts.append(
                q.sort_values(["layer", "feature", "abs"], ascending=[True, True, False]).assign(kind="quantile")
            )
        ex = pd.concat(parts, ignore_index=True)
        rec = self.records().merge(ex[["layer", "feature", "ctx"]], on=["layer", "feature", "ctx"])
        rec = rec.sort_values(["layer", "feature", "ctx", "pos"])
        lists = rec.groupby(["layer", "feature", "ctx"]).agg(nz_pos=("pos", list), nz_act=("act", list)).reset_index()
        ex = ex.merge(lists, on=["layer", "feature", "ctx"], how="left")
        return cast(pd.DataFrame, ex[cols]).reset_index(drop=True)

    def feature_examples(
        self, examples: pd.DataFrame, layer: int, feature: int, stats: pd.DataFrame | None = None
    ) -> FeatureExamples:
        """The :class:`FeatureExamples` of one feature from a :meth:`select_examples` table."""
        groups = examples.attrs.get("_groups")
        if groups is None:  # built once per examples table
            groups = examples.groupby(["layer", "feature"]).indices if len(examples) else {}
            examples.attrs["_groups"] = groups
        sel = examples.iloc[groups.get((layer, feature), np.zeros(0, dtype=np.int64))]
        ctxs = self.contexts
        pos = self._ctx_positions(sel["ctx"].to_numpy())
        out: list[Example] = []
        for (_, row), p in zip(sel.iterrows(), pos):
            c = ctxs.iloc[int(p)]
            acts = np.zeros(len(c["token_ids"]), dtype=np.float32)
            acts[np.asarray(row["nz_pos"], dtype=np.int64)] = np.asarray(row["nz_act"], dtype=np.float32)
            out.append(
                Example(
                    int(row["ctx"]),
                    str(row["kind"]),
                    float(row["act"]),
                    str(c["text"]),
                    list(c["starts"]),
                    list(c["ends"]),
                    acts,
                )
            )
        st = (stats if stats is not None else self.feature_stats([(layer, feature)])).set_index(["layer", "feature"])
        max_act = float(st.at[(layer, feature), "max_act"]) if (layer, feature) in st.index else 0.0
        n_active = int(st.at[(layer, feature), "n_active"]) if (layer, feature) in st.index else 0
        return FeatureExamples(layer, feature, max_act, n_active, self.n_contexts, out)


# --------------------------------------------------------------------------- streaming mode
def _hash01(seed: int, layer: int, features: np.ndarray, ctx: np.ndarray) -> np.ndarray:
    """``[B, U]`` uniform [0, 1) numbers from a splitmix64 hash of (seed, layer, feature, context).

    A pure function of its inputs: the reservoir keeps the same contexts however the corpus is
    batched or resumed.
    """
    with np.errstate(over="ignore"):
        f = features.astype(np.uint64)[None, :]
        c = ctx.astype(np.uint64)[:, None]
        x = (np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)) ^ (np.uint64(layer) * np.uint64(0xD1B54A32D192ED03))
        x = x ^ (f * np.uint64(0xABC98388FB8FAC03)) ^ (c * np.uint64(0x8CB92BA72F3D8DD7))
        x = x ^ (x >> np.uint64(30))
        x = x * np.uint64(0xBF58476D1CE4E5B9)
        x = x ^ (x >> np.uint64(27))
        x = x * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) * (2.0**-53)


def _sort_rows(primary: torch.Tensor, ctx: torch.Tensor, descending: bool) -> torch.Tensor:
    """Per row, the order by ``primary`` (desc or asc), ties by ascending context id (``[U, M]``)."""
    o1 = torch.argsort(ctx, dim=1, stable=True)
    p = primary.gather(1, o1)
    o2 = torch.argsort(-p if descending else p, dim=1, stable=True)
    return o1.gather(1, o2)


class StreamingExamples:
    """Running top-N and reservoir of active contexts for a fixed list of features.

    State per feature u (U features, N = ``n_top``, R = ``reservoir``, T = ``ctx_len``):
    ``n_active[u]``; top ``[U, N]`` |act|, signed act, context id, argmax position and token
    activations ``[U, N, T]``; the same for the reservoir, plus its hash keys. A context's
    activation is the value at its token of largest |activation| (records mode's definition).
    """

    FIELDS = ("abs", "act", "ctx", "pos", "tok")

    def __init__(self, features: Sequence[FeatureKey], n_top: int, reservoir: int, ctx_len: int, seed: int = 0) -> None:
        self.keys = sorted({(int(l), int(f)) for l, f in features})
        U, N, R, T = len(self.keys), int(n_top), int(reservoir), int(ctx_len)
        self.n_top, self.reservoir, self.ctx_len, self.seed = N, R, T, int(seed)
        self.index = {k: i for i, k in enumerate(self.keys)}
        self.n_active = torch.zeros(U, dtype=torch.int64)
        self.next_batch = 0
        self.top = self._empty(U, N, float("-inf"))
        self.res = self._empty(U, R, float("-inf"))
        self.res_key = torch.full((U, R), float("inf"), dtype=torch.float64)

    def _empty(self, U: int, M: int, fill: float) -> dict[str, torch.Tensor]:
        return {
            "abs": torch.full((U, M), fill),
            "act": torch.zeros(U, M),
            "ctx": torch.full((U, M), -1, dtype=torch.int64),
            "pos": torch.full((U, M), -1, dtype=torch.int64),
            "tok": torch.zeros(U, M, self.ctx_len),
        }

    @property
    def nbytes(self) -> int:
        ts = list(self.top.values()) + list(self.res.values()) + [self.res_key, self.n_active]
        return sum(t.numel() * t.element_size() for t in ts)

    def update(self, layer: int, features: torch.Tensor, acts: torch.Tensor, ctx_ids: torch.Tensor) -> None:
        """Fold one batch of one layer in.

        Args:
            features: ``[U_l]`` feature ids of ``layer`` (all in this collector).
            acts: ``[B, T_b, U_l]`` activations, zero at BOS and padding.
            ctx_ids: ``[B]`` context ids of the batch rows.
        """
        u = self._rows_of(layer, features)
        a = acts.detach().float().cpu()
        B, Tb, Ul = a.shape
        if Tb < self.ctx_len:
            a = torch.nn.functional.pad(a, (0, 0, 0, self.ctx_len - Tb))
        a = a[:, : self.ctx_len]
        best_abs, best_pos = a.abs().max(dim=1)  # [B, U_l]
        best_act = a.gather(1, best_pos[:, None, :]).squeeze(1)
        active = best_abs > 0
        self.n_active[u] += active.sum(0)
        ctx = ctx_ids.detach().cpu().long()
        cand = {
            "abs": torch.where(active, best_abs, torch.tensor(float("-inf"))).T,
            "act": best_act.T,
            "ctx": torch.where(active, ctx[:, None], torch.tensor(-1)).T,
            "pos": best_pos.T,
            "tok": a.permute(2, 0, 1),
        }  # [U_l, B, ...]
        # top-N (|act| descending, ties by context id): only features where a candidate can enter,
        # i.e. one at least as strong as the current N-th (or the list is not full yet)
        need = (active.T & (cand["abs"] >= self.top["abs"][u, -1:])).any(1).nonzero().squeeze(1)
        if need.numel():
            ur = u[need]
            merged = {k: torch.cat([self.top[k][ur], cand[k][need]], 1) for k in self.FIELDS}
            ctx_key = merged["ctx"].masked_fill(merged["ctx"] < 0, 1 << 62)
            order = _sort_rows(merged["abs"], ctx_key, True)[:, : self.n_top]
            for k in self.FIELDS:
                self.top[k][ur] = self._take(merged[k], order)
        # reservoir: the R active contexts of smallest hash key = a uniform sample without replacement
        key = torch.from_numpy(_hash01(self.seed, layer, features.numpy(), ctx.numpy())).T  # [U_l, B]
        key = torch.where(active.T, key, torch.tensor(float("inf"), dtype=torch.float64))
        need = (key <= self.res_key[u, -1:]).any(1).nonzero().squeeze(1)
        if need.numel():
            ur = u[need]
            mk = torch.cat([self.res_key[ur], key[need]], 1)
            merged = {k: torch.cat([self.res[k][ur], cand[k][need]], 1) for k in self.FIELDS}
            ctx_key = merged["ctx"].masked_fill(merged["ctx"] < 0, 1 << 62)
            order = _sort_rows(mk, ctx_key, False)[:, : self.reservoir]
            self.res_key[ur] = mk.gather(1, order)
            for k in self.FIELDS:
                self.res[k][ur] = self._take(merged[k], order)

    def _rows_of(self, layer: int, features: torch.Tensor) -> torch.Tensor:
        """State rows of ``features`` of ``layer`` (looked up once per layer and feature list)."""
        key = (layer, features.numpy().tobytes())
        cache = self.__dict__.setdefault("_row_cache", {})
        if key not in cache:
            cache[key] = torch.tensor([self.index[(layer, int(f))] for f in features.tolist()], dtype=torch.long)
        return cache[key]

    @staticmethod
    def _take(t: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        if t.dim() == 3:
            return t.gather(1, order[..., None].expand(-1, -1, t.shape[2]))
        return t.gather(1, order)

    # ------------------------------------------------------------ persistence
    def save(self, path: Path) -> None:
        arrays: dict[str, Any] = {f"top_{k}": v.numpy() for k, v in self.top.items()}
        arrays.update({f"res_{k}": v.numpy() for k, v in self.res.items()})
        arrays.update(
            res_key=self.res_key.numpy(),
            n_active=self.n_active.numpy(),
            keys=np.asarray(self.keys, dtype=np.int64).reshape(-1, 2),
            meta=np.asarray([self.n_top, self.reservoir, self.ctx_len, self.seed, self.next_batch], dtype=np.int64),
        )

        def dump(tmp: Path) -> None:
            with open(tmp, "wb") as fh:
                np.savez_compressed(fh, **arrays)  # token activations are mostly zeros

        write_atomic(path, dump)

    @classmethod
    def load(cls, path: Path) -> "StreamingExamples":
        with np.load(path) as z:
            n_top, res, ctx_len, seed, next_batch = (int(x) for x in z["meta"])
            obj = cls([tuple(k) for k in z["keys"].tolist()], n_top, res, ctx_len, seed)
            obj.next_batch = next_batch
            obj.n_active = torch.from_numpy(z["n_active"].copy())
            obj.res_key = torch.from_numpy(z["res_key"].copy())
            for k in cls.FIELDS:
                obj.top[k] = torch.from_numpy(z[f"top_{k}"].copy())
                obj.res[k] = torch.from_numpy(z[f"res_{k}"].copy())
        return obj

    # ------------------------------------------------------------ outputs
    def stats(self, n_contexts: int) -> pd.DataFrame:
        """layer, feature, max_act (signed, at the largest |activation|), n_active, density."""
        keys = np.asarray(self.keys, dtype=np.int64).reshape(-1, 2)
        n = self.n_active.numpy()
        return pd.DataFrame(
            {
                "layer": keys[:, 0],
                "feature": keys[:, 1],
                "max_act": np.where(n > 0, self.top["act"][:, 0].numpy(), 0.0).astype(float),
                "n_active": n.astype(int),
                "density": n / max(n_contexts, 1),
            }
        )

    def _table(self, part: dict[str, torch.Tensor], extra: dict[str, np.ndarray] | None = None) -> pd.DataFrame:
        U, M = part["ctx"].shape
        keys = np.asarray(self.keys, dtype=np.int64).reshape(-1, 2)
        df = pd.DataFrame(
            {
                "u": np.repeat(np.arange(U), M),
                "slot": np.tile(np.arange(M), U),
                "layer": np.repeat(keys[:, 0], M),
                "feature": np.repeat(keys[:, 1], M),
                "ctx": part["ctx"].numpy().ravel(),
                "act": part["act"].numpy().ravel(),
                "abs": part["abs"].numpy().ravel(),
                "pos": part["pos"].numpy().ravel(),
                **(extra or {}),
            }
        )
        return cast(pd.DataFrame, df[df["ctx"] >= 0])

    def examples(self, cfg: ExampleConfig) -> pd.DataFrame:
        """Top and quantile examples, with :meth:`ActivationStore.select_examples`' columns.

        Top rows are the exact top ``n_top`` (rank = rank by |act|). Quantile rows: the reservoir
        (a uniform sample of the feature's active contexts) ranked by |act| gives each entry an
        estimated quantile; ``n_quantile_bins`` bins of it, minus the top contexts, each give
        ``n_per_quantile`` entries of smallest hash key (random). ``rank`` of a quantile row is its
        estimated rank among all active contexts.
        """
        cols = ["layer", "feature", "kind", "rank", "ctx", "act", "pos", "nz_pos", "nz_act"]
        top = self._table(self.top)
        top = top[top["slot"] < cfg.n_top].assign(kind="top", rank=lambda d: d["slot"])
        parts = [top]
        if cfg.n_quantile_bins > 0 and cfg.n_per_quantile > 0 and self.reservoir > 0:
            res = self._table(self.res, {"key": self.res_key.numpy().ravel()})
            res = res.sort_values(["u", "abs", "ctx"], ascending=[True, False, True], kind="stable")
            g = res.groupby("u", sort=False)
            r = g.cumcount().to_numpy()
            n_res = g["ctx"].transform("size").to_numpy()
            res["qbin"] = (r * cfg.n_quantile_bins // n_res).astype(int)
            n_act = self.n_active.numpy()[res["u"].to_numpy()]
            res["rank"] = (r * n_act // n_res).astype(int)
            in_top = pd.MultiIndex.from_frame(cast(pd.DataFrame, top[["u", "ctx"]]))
            res = cast(pd.DataFrame, res[~pd.MultiIndex.from_frame(cast(pd.DataFrame, res[["u", "ctx"]])).isin(in_top)])
            res = res.sort_values(["u", "qbin", "key"], kind="stable")
            q = res.groupby(["u", "qbin"], sort=False).head(cfg.n_per_quantile)
            parts.append(
                q.sort_values(["u", "abs", "ctx"], ascending=[True, False, True], kind="stable").assign(kind="quantile")
            )
        ex = pd.concat(parts, ignore_index=True)
        if len(ex) == 0:
            return pd.DataFrame({c: [] for c in cols})
        src = {"top": self.top["tok"], "quantile": self.res["tok"]}
        nz_pos, nz_act = [], []
        for kind, u, slot in zip(ex["kind"].to_numpy(), ex["u"].to_numpy(), ex["slot"].to_numpy()):
            tok = src[kind][u, slot].numpy()
            nz = np.nonzero(tok)[0]
            nz_pos.append(nz.astype(np.int64).tolist())
            nz_act.append(tok[nz].astype(np.float32).tolist())
        ex["nz_pos"], ex["nz_act"] = nz_pos, nz_act
        ex = ex.sort_values(["layer", "feature"], kind="stable")
        ex = ex.astype({"layer": np.int32, "feature": np.int32, "pos": np.int32, "act": np.float32})
        return ex[cols].reset_index(drop=True)

    def token_acts(self, layer: int, feature: int, ctx_ids: Sequence[int]) -> list[np.ndarray] | None:
        """Token activations of contexts held in the top list or the reservoir (None if one is not)."""
        u = self.index[(layer, feature)]
        held = {}
        for part in (self.res, self.top):
            for slot, c in enumerate(part["ctx"][u].tolist()):
                if c >= 0:
                    held[c] = part["tok"][u, slot].numpy()
        if not all(int(c) in held for c in ctx_ids):
            return None
        return [held[int(c)] for c in ctx_ids]


def batch_activations(
    model: LoadedModel,
    clt: CrossLayerTranscoder,
    token_lists: Sequence[Sequence[int]],
    by_layer: dict[int, torch.Tensor],
    pad_id: int,
) -> Iterable[tuple[int, torch.Tensor, torch.Tensor]]:
    """(layer, features ``[U_l]``, activations ``[B, T, U_l]`` zeroed at BOS/padding) per layer, one forward."""
    from pie_lib.engine.traces import run_with_cache

    ids, valid = pad_batch(token_lists, pad_id)
    cache = run_with_cache(model, ids)
    for layer, feats in by_layer.items():
        acts = encode_features(clt, cache.resid_mid[layer], layer, feats)
        yield layer, feats, acts * valid.to(acts.device)[..., None]
