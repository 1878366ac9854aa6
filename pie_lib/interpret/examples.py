"""Activation examples: stream a corpus through model + CLT, keep what each feature fires on.

The corpus is cut into contexts (``contexts.parquet``); batch after batch goes through one
:func:`~pie_lib.engine.traces.run_with_cache` and, per source layer, one :func:`encode_features`
restricted to the requested features (their encoder rows gathered; no loop over features).
Position 0 (BOS) and padding are excluded. A context's activation is the value at its token of
largest ``|activation|``. Features collected in an earlier run are not recomputed (a new *round*
covers only the new ones). Two stores:

**stream** (default, :class:`StreamingExamples`): per round, a state of fixed size
``O(features x (n_top x ctx_len + reservoir x ctx_len + eval_top + eval_reservoir + context_sample))``,
whatever the corpus length or feature density, checkpointed every ``checkpoint_every`` batches
(``rounds/<id>/stream.npz``; a rerun resumes after the last saved batch). Per feature: the exact
active-context count; the exact top ``n_top`` contexts with token activations (the top examples)
and the top ``eval_top`` as values; the ``reservoir`` / ``eval_reservoir`` active contexts of
smallest splitmix64 hash of (seed, layer, feature, context) -- uniform samples without replacement
of its active contexts, independent of batching and resume points -- the first with token
activations (quantile examples, bins estimated from it), the second as values; and its activation
on a uniform sample of ``context_sample`` contexts shared by all features (smallest hash of
(seed, context); the whole corpus when it is at most that long). :meth:`ActivationStore.natural_acts`
turns this into what ``pie evaluate`` samples from (:class:`NaturalActs`): exact when the context
sample is the corpus, else held contexts with weights (exact top, reservoir, silent contexts of the
context sample).

**records** (``ExampleConfig(store="records")``, ``pie interpret --examples-store records``): every
nonzero activation, one parquet part per batch (``rounds/<id>/part-<batch>.parquet``: layer,
feature, ctx, pos, act), written atomically so a rerun skips finished batches; disk grows with
corpus x density. :meth:`ActivationStore.select_examples` then takes, per feature, the ``n_top``
contexts of largest ``|activation|`` and ``n_per_quantile`` contexts from each of
``n_quantile_bins`` activation-quantile bins of the remaining active contexts (seeded shuffle).
Both write ``examples.parquet`` with the nonzero token activations of every example.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import zipfile
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
        n_top: top-activating contexts kept per feature (with their token activations).
        n_quantile_bins, n_per_quantile: quantile-sampled contexts (below the top ones).
        seed: seed of the quantile sampling and of the streaming store's hashes (reservoirs and
            the context sample).
        store: "stream" (default: running top lists, reservoirs and a shared context sample, bounded
            by the features explained) or "records" (every nonzero activation on disk, grows with
            corpus x density).
        reservoir: reservoir contexts per feature with token activations, for the quantile examples
            (stream mode; 0 = 4 x bins x per-bin samples).
        eval_top: stream mode: the strongest contexts kept per feature as values only (context id
            and activation) for ``pie evaluate``'s draws from the top; at least ``n_top``.
        eval_reservoir: stream mode: a uniform sample of each feature's active contexts, values
            only, for ``pie evaluate``'s draws from the activation-percentile bins and the feature
            pages' activation quantiles (all of them when the feature is active on fewer).
        context_sample: stream mode: a uniform sample of all contexts (the same for every feature,
            by a seeded hash of the context id) with every explained feature's activation on each,
            for ``pie evaluate``'s draws of non-activating and random contexts and for clarity's
            natural side; when the corpus has at most this many contexts it holds all of them and
            evaluation is exact.
        checkpoint_every: stream mode writes its state every this many batches (resume point).
    """

    batch_size: int = 32
    n_top: int = 40
    n_quantile_bins: int = 4
    n_per_quantile: int = 5
    seed: int = 0
    store: str = "stream"
    reservoir: int = 0
    eval_top: int = 256
    eval_reservoir: int = 1024
    context_sample: int = 4096
    checkpoint_every: int = 50

    def reservoir_size(self) -> int:
        """Contexts kept per feature for quantile sampling (default 4 x bins x per-bin samples)."""
        return self.reservoir or 4 * max(1, self.n_quantile_bins) * max(1, self.n_per_quantile)

    def check(self) -> None:
        """One-line errors for settings that cannot work together."""
        if self.store not in ("records", "stream"):
            raise DataFormatError(f"example store {self.store!r}: use 'stream' (default) or 'records'")
        if self.store == "stream" and self.eval_top < self.n_top:
            raise DataFormatError(
                f"eval_top ({self.eval_top}) < n_top ({self.n_top}): the values-only top list must hold the top "
                "examples; raise --eval-top or lower --n-top"
            )
        for name in ("batch_size", "eval_reservoir", "context_sample", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise DataFormatError(f"{name} = {getattr(self, name)}: must be >= 1")


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
        cfg.check()
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
                f"{root} is a {old.get('store', 'records')!r} example store, not {cfg.store!r}; pass "
                f"--examples-store {old.get('store', 'records')} or a fresh --out folder",
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
                    "eval_top": cfg.eval_top,
                    "eval_reservoir": cfg.eval_reservoir,
                    "context_sample": cfg.context_sample,
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
                    int(r.get("eval_top", cfg.eval_top)),
                    int(r.get("eval_reservoir", cfg.eval_reservoir)),
                    context_sample(
                        ctx_ids.numpy(), int(r.get("context_sample", cfg.context_sample)), int(r.get("seed", cfg.seed))
                    ),
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
        """``[N]`` activation of every context (zeros for contexts where the feature is silent).

        A streaming store has it only when its context sample holds every context (a corpus of at
        most ``context_sample`` contexts); otherwise use :meth:`natural_acts`.
        """
        if self.is_stream:
            st = self._eval_stream(layer, feature)
            if len(st.sample_ctx) != self.n_contexts:
                raise DataFormatError(
                    f"{self.root}: streaming store of {self.n_contexts} contexts holds every feature's activation on a "
                    f"uniform sample of {len(st.sample_ctx)}; dense_acts needs all of them: use natural_acts(), or "
                    "rebuild with a larger --context-sample or --examples-store records"
                )
            out = np.zeros(self.n_contexts, dtype=np.float64)
            out[self._ctx_positions(st.sample_ctx)] = st.sample_act[st.index[(layer, feature)]].numpy()
            return out
        ct = self.context_table()
        rows = self._group_rows("ct", layer, feature)
        out = np.zeros(self.n_contexts, dtype=np.float64)
        out[self._ctx_positions(ct["ctx"].to_numpy()[rows])] = ct["act"].to_numpy()[rows]
        return out

    def _eval_stream(self, layer: int, feature: int) -> "StreamingExamples":
        """The streaming state holding ``(layer, feature)``, with the state evaluation needs."""
        st = self._stream_of(layer, feature)
        if st is None:
            raise DataFormatError(
                f"{self.root}: feature ({layer}, {feature}) has no activations in this store; rerun `pie interpret` "
                "with it (or its selections)"
            )
        if not st.has_eval_state:
            raise DataFormatError(
                f"{self.root}: streaming store written by an older pie_lib, without the context sample that "
                "pie evaluate needs; rerun `pie interpret` into a fresh --out folder"
            )
        return st

    def natural_acts(self, layer: int, feature: int) -> NaturalActs:
        """A feature's activations on the corpus contexts, as ``pie evaluate`` samples them
        (:class:`NaturalActs`: exact in records mode and whenever the context sample is the corpus)."""
        if not self.is_stream:
            return NaturalActs.dense(self.dense_acts(layer, feature))
        st = self._eval_stream(layer, feature)
        d = st.natural(layer, feature, self.n_contexts)
        u = st.index[(layer, feature)]
        return NaturalActs(
            pos=self._ctx_positions(d["ctx"]),
            acts=d["acts"],
            weight=d["weight"],
            uniform_pos=self._ctx_positions(d["uniform_ctx"]),
            uniform_acts=d["uniform_acts"],
            n_contexts=self.n_contexts,
            n_active=int(st.n_active[u]),
            n_top_exact=int(d["n_top_exact"]),
        )

    def active_acts(self, layer: int, feature: int) -> tuple[np.ndarray, bool]:
        """Activations of the feature's active contexts: ``(values, exact)``; all of them (exact) in
        records mode, or when the streaming store's samples hold them all; else a uniform sample."""
        if not self.is_stream:
            d = self.dense_acts(layer, feature)
            return d[d != 0], True
        st = self._eval_stream(layer, feature)
        u = st.index[(layer, feature)]
        if len(st.sample_ctx) == self.n_contexts:
            a = st.sample_act[u].numpy().astype(np.float64)
            return a[a != 0], True
        a = st.active_sample(layer, feature)
        return a, len(a) == int(st.n_active[u])

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
def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        x = x ^ (x >> np.uint64(30))
        x = x * np.uint64(0xBF58476D1CE4E5B9)
        x = x ^ (x >> np.uint64(27))
        x = x * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return x


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
    return (_mix64(x) >> np.uint64(11)).astype(np.float64) * (2.0**-53)


def context_sample(ctx_ids: np.ndarray, size: int, seed: int) -> np.ndarray:
    """The ``size`` context ids of smallest seeded hash (all when there are fewer): a uniform sample
    without replacement of the contexts, shared by every feature, independent of batching. Sorted."""
    ids = np.asarray(ctx_ids, dtype=np.int64)
    if len(ids) <= size:
        return np.sort(ids)
    with np.errstate(over="ignore"):
        x = (np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)) ^ np.uint64(0x5851F42D4C957F2D)
        key = _mix64(x ^ (ids.astype(np.uint64) * np.uint64(0x8CB92BA72F3D8DD7)))
    order = np.lexsort((ids, key))  # by hash, ties by id
    return np.sort(ids[order[:size]])


def _sort_rows(primary: torch.Tensor, ctx: torch.Tensor, descending: bool) -> torch.Tensor:
    """Per row, the order by ``primary`` (desc or asc), ties by ascending context id (``[U, M]``)."""
    o1 = torch.argsort(ctx, dim=1, stable=True)
    p = primary.gather(1, o1)
    o2 = torch.argsort(-p if descending else p, dim=1, stable=True)
    return o1.gather(1, o2)


@dataclass
class NaturalActs:
    """A feature's activations on the corpus contexts, as ``pie evaluate`` samples them.

    ``pos``/``acts``/``weight`` are the *held* contexts; each stands for ``weight`` corpus contexts
    of its kind (1 = only itself). With every context held (records mode, or a streaming store whose
    context sample is the whole corpus) all weights are 1 and these are the exact activations of
    every context. Otherwise the held contexts are: the exact top list (weight 1); the rest of a
    uniform sample of the active contexts (weight = remaining active contexts / their number there,
    1 when the sample holds all of them); the silent contexts of the uniform context sample (weight
    = silent contexts / their number there). The active and silent counts are exact; the rank of a
    held active context below the top list is estimated from the sample.

    Attributes:
        pos: ``[P]`` positions of the held contexts in the store's contexts table.
        acts: ``[P]`` their activation (value at the token of largest |activation|).
        weight: ``[P]`` corpus contexts each stands for.
        uniform_pos, uniform_acts: ``[M]`` a uniform sample without replacement of all contexts
            and their activations (every context when exact): clarity's natural side and the
            random draws of the "pie" protocol.
        n_top_exact: the first this many held contexts are the exact top list by |activation|
            (all of them when exact).
    """

    pos: np.ndarray
    acts: np.ndarray
    weight: np.ndarray
    uniform_pos: np.ndarray
    uniform_acts: np.ndarray
    n_contexts: int
    n_active: int
    n_top_exact: int

    @property
    def exact(self) -> bool:
        return len(self.pos) == self.n_contexts and bool((self.weight == 1).all())

    @classmethod
    def dense(cls, acts: np.ndarray) -> "NaturalActs":
        """Every context held, with its exact activation (``acts`` ``[N]``, index = position)."""
        a = np.asarray(acts, dtype=np.float64)
        n = len(a)
        return cls(np.arange(n), a, np.ones(n), np.arange(n), a, n, int((a != 0).sum()), n)


class StreamingExamples:
    """Running top lists, reservoirs and a context sample for a fixed list of features.

    State per feature u (U features, N = ``n_top``, R = ``reservoir``, T = ``ctx_len``):
    ``n_active[u]``; ``top``: the N strongest contexts (|act|, signed act, context id, argmax
    position, token activations ``[U, N, T]``); ``res``: the R active contexts of smallest hash key
    with the same fields plus the key (a uniform sample, for quantile examples); ``etop`` and
    ``eres``: the same two lists at sizes ``eval_top`` / ``eval_reservoir`` as values only (|act|,
    act, context id; the reservoir's keys) for ``pie evaluate``; ``sample_act`` ``[U, M]``: every
    feature's activation on the M contexts of ``sample_ctx`` (:func:`context_sample`). A context's
    activation is the value at its token of largest |activation| (records mode's definition).
    Lists are nested: ``top`` is the head of ``etop`` and ``res`` the head of ``eres``. While
    streaming, ``top`` and ``res`` are kept in slots (an entering context takes the slot of the one it
    evicts) and the candidates of ``etop`` / ``eres`` are merged every ``FLUSH_EVERY`` batches;
    :meth:`flush` and :meth:`canonical` (run on save and before any output) restore the order.
    """

    FIELDS = ("abs", "act", "ctx", "pos", "tok")
    FLUSH_EVERY = 8

    def __init__(
        self,
        features: Sequence[FeatureKey],
        n_top: int,
        reservoir: int,
        ctx_len: int,
        seed: int = 0,
        eval_top: int = 0,
        eval_reservoir: int = 0,
        sample_ctx: np.ndarray | None = None,
    ) -> None:
        self.keys = sorted({(int(l), int(f)) for l, f in features})
        U, N, R, T = len(self.keys), int(n_top), int(reservoir), int(ctx_len)
        self.n_top, self.reservoir, self.ctx_len, self.seed = N, R, T, int(seed)
        self.eval_top, self.eval_reservoir = int(eval_top), int(eval_reservoir)
        self.index = {k: i for i, k in enumerate(self.keys)}
        self.n_active = torch.zeros(U, dtype=torch.int64)
        self.next_batch = 0
        self.top = self._empty(U, N, tokens=True)
        self.res = self._empty(U, R, tokens=True, key=True)
        self.etop = self._empty(U, self.eval_top)
        self.eres = self._empty(U, self.eval_reservoir, key=True)
        self.sample_ctx = np.zeros(0, dtype=np.int64) if sample_ctx is None else np.asarray(sample_ctx, dtype=np.int64)
        self.sample_act = torch.zeros(U, len(self.sample_ctx))
        self.has_eval_state = sample_ctx is not None
        # candidates for the long values-only lists, merged every FLUSH_EVERY batches (one sort of
        # M + k*B instead of k sorts of M + B; the lists are set functions of the candidates, so
        # the result does not depend on when they are merged)
        self._pending: dict[int, list[tuple[torch.Tensor, dict[str, torch.Tensor]]]] = {}

    def _empty(self, U: int, M: int, tokens: bool = False, key: bool = False) -> dict[str, torch.Tensor]:
        part = {
            "abs": torch.full((U, M), float("-inf")),
            "act": torch.zeros(U, M),
            "ctx": torch.full((U, M), -1, dtype=torch.int64),
        }
        if tokens:
            part["pos"] = torch.full((U, M), -1, dtype=torch.int64)
            part["tok"] = torch.zeros(U, M, self.ctx_len)
        if key:
            part["key"] = torch.full((U, M), float("inf"), dtype=torch.float64)
        return part

    @property
    def res_key(self) -> torch.Tensor:
        return self.res["key"]

    @property
    def nbytes(self) -> int:
        ts = [t for part in (self.top, self.res, self.etop, self.eres) for t in part.values()]
        ts += [self.n_active, self.sample_act]
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
        key = torch.from_numpy(_hash01(self.seed, layer, features.numpy(), ctx.numpy())).T  # [U_l, B]
        cand = {
            "abs": torch.where(active, best_abs, torch.tensor(float("-inf"))).T,
            "act": best_act.T,
            "ctx": torch.where(active, ctx[:, None], torch.tensor(-1)).T,
            "pos": best_pos.T,
            "tok": a.permute(2, 0, 1),
            "key": torch.where(active.T, key, torch.tensor(float("inf"), dtype=torch.float64)),
        }  # [U_l, B, ...]
        # top lists (|act| descending, ties by context id) and reservoirs (the active contexts of
        # smallest hash key = a uniform sample without replacement); a batch is merged only into
        # the features where a candidate can enter
        # the lists with token activations are kept in slots, unordered, while streaming: an entering
        # candidate overwrites the slot of the entry it evicts (no copy of the [M, T] activations)
        if self.n_top:
            worst = self.top["abs"][u].amin(1, keepdim=True)
            need = (active.T & (cand["abs"] >= worst)).any(1).nonzero().squeeze(1)
            self._fold_slots(self.top, u, cand, need, "abs", True)
        if self.reservoir:
            worst = self.res["key"][u].amax(1, keepdim=True)
            need = (cand["key"] <= worst).any(1).nonzero().squeeze(1)
            self._fold_slots(self.res, u, cand, need, "key", False)
        if self.eval_top or self.eval_reservoir:
            if self._pending.get(layer) and not torch.equal(self._pending[layer][0][0], u):
                self._flush_layer(layer)  # another feature list of this layer: merge what is pending first
            pend = self._pending.setdefault(layer, [])
            pend.append((u, {k: cand[k] for k in ("abs", "act", "ctx", "key")}))
            if len(pend) >= self.FLUSH_EVERY:
                self._flush_layer(layer)
        if len(self.sample_ctx):  # the shared context sample: every feature's activation there
            where = np.searchsorted(self.sample_ctx, ctx.numpy())
            where = np.minimum(where, len(self.sample_ctx) - 1)
            hit = self.sample_ctx[where] == ctx.numpy()
            if hit.any():
                cols = torch.from_numpy(where[hit])
                self.sample_act[u[:, None], cols[None, :]] = best_act[torch.from_numpy(hit)].T

    def _flush_layer(self, layer: int) -> None:
        pend = self._pending.pop(layer, [])
        if not pend:
            return
        u = pend[0][0]
        cand = {k: torch.cat([c[k] for _, c in pend], 1) for k in pend[0][1]}
        if self.eval_top:
            need = (cand["ctx"] >= 0) & (cand["abs"] >= self.etop["abs"][u, -1:])
            self._fold(self.etop, u, cand, need.any(1).nonzero().squeeze(1), "abs", True, self.eval_top)
        if self.eval_reservoir:
            need = (cand["key"] <= self.eres["key"][u, -1:]).any(1).nonzero().squeeze(1)
            self._fold(self.eres, u, cand, need, "key", False, self.eval_reservoir)

    def flush(self) -> None:
        """Merge the pending candidates into the values-only lists (before saving or reading them)."""
        for layer in list(self._pending):
            self._flush_layer(layer)

    def _fold_slots(
        self,
        part: dict[str, torch.Tensor],
        u: torch.Tensor,
        cand: dict[str, torch.Tensor],
        need: torch.Tensor,
        primary: str,
        descending: bool,
    ) -> None:
        """Like :meth:`_fold` for a slot list: the kept set is the same (the first M by ``primary``,
        ties by context id), but only entering candidates are written, into the evicted slots."""
        if not need.numel():
            return
        ur = u[need]
        M = part["ctx"].shape[1]
        prim = torch.cat([part[primary][ur], cand[primary][need]], 1)
        ctx = torch.cat([part["ctx"][ur], cand["ctx"][need]], 1)
        order = _sort_rows(prim, ctx.masked_fill(ctx < 0, 1 << 62), descending)[:, :M]
        keep = torch.zeros(prim.shape, dtype=torch.bool).scatter_(1, order, True)
        ev_r, ev_s = (~keep[:, :M]).nonzero(as_tuple=True)  # freed slots, row-major
        en_r, en_j = keep[:, M:].nonzero(as_tuple=True)  # entering candidates, row-major: the same rows
        if not len(en_r):
            return
        assert torch.equal(ev_r, en_r)  # as many slots freed as candidates enter, row by row
        rows, src = ur[ev_r], need[en_r]
        for k in part:
            part[k][rows, ev_s] = cand[k][src, en_j]

    def canonical(self) -> None:
        """Put the slot lists in their order (top: |act| descending; reservoir: key ascending; ties
        by context id), as outputs and saved states expect."""
        for part, primary, desc in ((self.top, "abs", True), (self.res, "key", False)):
            if part["ctx"].shape[1] == 0:
                continue
            ctx = part["ctx"]
            order = _sort_rows(part[primary], ctx.masked_fill(ctx < 0, 1 << 62), desc)
            for k in part:
                part[k] = self._take(part[k], order)

    def _fold(
        self,
        part: dict[str, torch.Tensor],
        u: torch.Tensor,
        cand: dict[str, torch.Tensor],
        need: torch.Tensor,
        primary: str,
        descending: bool,
        size: int,
    ) -> None:
        """Merge the candidates of rows ``need`` into ``part`` and keep its first ``size`` by ``primary``."""
        if not need.numel():
            return
        ur = u[need]
        merged = {k: torch.cat([part[k][ur], cand[k][need]], 1) for k in part}
        ctx_key = merged["ctx"].masked_fill(merged["ctx"] < 0, 1 << 62)
        order = _sort_rows(merged[primary], ctx_key, descending)[:, :size]
        for k in part:
            part[k][ur] = self._take(merged[k], order)

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
        self.flush()
        self.canonical()
        arrays: dict[str, Any] = {}
        for name in ("top", "res", "etop", "eres"):
            arrays.update({f"{name}_{k}": v.numpy() for k, v in getattr(self, name).items()})
        arrays.update(
            n_active=self.n_active.numpy(),
            keys=np.asarray(self.keys, dtype=np.int64).reshape(-1, 2),
            meta=np.asarray(
                [
                    self.n_top,
                    self.reservoir,
                    self.ctx_len,
                    self.seed,
                    self.next_batch,
                    self.eval_top,
                    self.eval_reservoir,
                ],
                dtype=np.int64,
            ),
            sample_ctx=self.sample_ctx,
            sample_act=self.sample_act.numpy(),
            has_eval_state=np.asarray(self.has_eval_state),
        )

        def dump(tmp: Path) -> None:
            # an .npz (np.load reads it) deflated at level 1: token activations are mostly zeros, and
            # zlib's default level took most of a checkpoint's time for little extra saving
            with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
                for name, arr in arrays.items():
                    with zf.open(f"{name}.npy", "w", force_zip64=True) as fh:
                        np.lib.format.write_array(fh, np.asanyarray(arr), allow_pickle=False)

        write_atomic(path, dump)

    @classmethod
    def load(cls, path: Path) -> "StreamingExamples":
        with np.load(path) as z:
            meta = [int(x) for x in z["meta"]]
            n_top, res, ctx_len, seed, next_batch = meta[:5]
            eval_top, eval_res = meta[5:7] if len(meta) >= 7 else (0, 0)  # older stores: no evaluation state
            has_eval = bool(z["has_eval_state"]) if "has_eval_state" in z.files else False
            sample = z["sample_ctx"].copy() if has_eval else None
            obj = cls([tuple(k) for k in z["keys"].tolist()], n_top, res, ctx_len, seed, eval_top, eval_res, sample)
            obj.next_batch = next_batch
            obj.n_active = torch.from_numpy(z["n_active"].copy())
            if "res_key" in z.files:  # the first streaming stores kept the reservoir's keys apart
                obj.res["key"] = torch.from_numpy(z["res_key"].copy())
            for name in ("top", "res", "etop", "eres"):
                part = getattr(obj, name)
                for k in part:
                    if f"{name}_{k}" in z.files:
                        part[k] = torch.from_numpy(z[f"{name}_{k}"].copy())
            if has_eval:
                obj.sample_act = torch.from_numpy(z["sample_act"].copy())
        return obj

    # ------------------------------------------------------------ outputs
    def stats(self, n_contexts: int) -> pd.DataFrame:
        """layer, feature, max_act (signed, at the largest |activation|), n_active, density."""
        self.canonical()
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
        self.canonical()
        top = self._table(self.top)
        top = top[top["slot"] < cfg.n_top].assign(kind="top", rank=lambda d: d["slot"])
        parts = [top]
        if cfg.n_quantile_bins > 0 and cfg.n_per_quantile > 0 and self.reservoir > 0:
            res = self._table(self.res, {"key": self.res["key"].numpy().ravel()})
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

    def natural(self, layer: int, feature: int, n_contexts: int) -> dict[str, Any]:
        """The held contexts of one feature (see :class:`NaturalActs`), by context id.

        Returns:
            ``ctx``, ``acts``, ``weight`` of the held contexts, ``n_top_exact``, and ``uniform_ctx`` /
            ``uniform_acts`` (the context sample); when the sample holds every context, the held
            contexts are exactly the sample (weights 1).
        """
        self.flush()
        u = self.index[(layer, feature)]
        s_ctx, s_act = self.sample_ctx, self.sample_act[u].numpy().astype(np.float64)
        out = {"uniform_ctx": s_ctx, "uniform_acts": s_act}
        if len(s_ctx) == n_contexts:  # the whole corpus: exact
            return out | {"ctx": s_ctx, "acts": s_act, "weight": np.ones(len(s_ctx)), "n_top_exact": len(s_ctx)}
        n_active = int(self.n_active[u])
        t_ctx = self.etop["ctx"][u].numpy()
        t_keep = t_ctx >= 0
        t_ctx, t_act = t_ctx[t_keep], self.etop["act"][u].numpy()[t_keep].astype(np.float64)
        r_ctx = self.eres["ctx"][u].numpy()
        r_keep = (r_ctx >= 0) & ~np.isin(r_ctx, t_ctx)
        r_ctx, r_act = r_ctx[r_keep], self.eres["act"][u].numpy()[r_keep].astype(np.float64)
        z_ctx = s_ctx[s_act == 0]
        n_rest, n_silent = n_active - len(t_ctx), n_contexts - n_active
        # eres is a uniform sample of the active contexts, so the part outside the (value-defined) top
        # list is a uniform sample of the remaining ones; likewise the sample's silent contexts
        w_r = n_rest / len(r_ctx) if len(r_ctx) else 0.0
        w_z = n_silent / len(z_ctx) if len(z_ctx) else 0.0
        return out | {
            "ctx": np.concatenate([t_ctx, r_ctx, z_ctx]),
            "acts": np.concatenate([t_act, r_act, np.zeros(len(z_ctx))]),
            "weight": np.concatenate([np.ones(len(t_ctx)), np.full(len(r_ctx), w_r), np.full(len(z_ctx), w_z)]),
            "n_top_exact": len(t_ctx),
        }

    def active_sample(self, layer: int, feature: int) -> np.ndarray:
        """Activations of the eval reservoir: a uniform sample of the active contexts (all when fewer)."""
        self.flush()
        u = self.index[(layer, feature)]
        keep = self.eres["ctx"][u].numpy() >= 0
        return self.eres["act"][u].numpy()[keep].astype(np.float64)


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
