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
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from pie_lib.errors import DataFormatError
from pie_lib.interpret.corpus import CorpusConfig, iter_documents, make_contexts
from pie_lib.store import check_same_config, read_config, write_json, write_parquet

log = logging.getLogger("pie_lib.interpret")

FeatureKey = tuple[int, int]  # (layer, feature)


@dataclass
class ExampleConfig:
    """How activation examples are collected and chosen.

    Attributes:
        batch_size: contexts per forward.
        n_top: top-activating contexts kept per feature.
        n_quantile_bins, n_per_quantile: quantile-sampled contexts (below the top ones).
        seed: seed of the quantile sampling.
    """

    batch_size: int = 32
    n_top: int = 40
    n_quantile_bins: int = 4
    n_per_quantile: int = 5
    seed: int = 0


# --------------------------------------------------------------------------- encoding
def encode_features(clt: Any, x: torch.Tensor, layer: int, features: torch.Tensor) -> torch.Tensor:
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
    model: Any, clt: Any, token_lists: Sequence[Sequence[int]], by_layer: dict[int, torch.Tensor], pad_id: int
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

    # ---------------------------------------------------------------- building
    @classmethod
    def build(
        cls,
        model: Any,
        clt: Any,
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
        manifest = {"version": 1, "identity": identity or {}, "corpus": asdict(corpus)}
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
            manifest = old
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

    def _extend(self, model: Any, clt: Any, features: list[FeatureKey], cfg: ExampleConfig, progress: bool) -> None:
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
                write_parquet(df[["layer", "feature", "ctx", "pos", "act"]], r["dir"] / f"part-{b:06d}.parquet")
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
        """All stored nonzero activations: layer, feature, ctx, pos, act."""
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
        ct = self.context_table()
        keys = pd.DataFrame(
            sorted(set(features) if features is not None else self.covered_features()), columns=["layer", "feature"]
        )
        if len(ct):
            idx = ct.groupby(["layer", "feature"])["abs"].idxmax()
            best = ct.loc[idx, ["layer", "feature", "act"]].rename(columns={"act": "max_act"})
            n = ct.groupby(["layer", "feature"]).size().rename("n_active").reset_index()
            keys = keys.merge(best, how="left", on=["layer", "feature"]).merge(n, how="left", on=["layer", "feature"])
        else:
            keys = keys.assign(max_act=np.nan, n_active=0)
        keys["max_act"] = keys["max_act"].fillna(0.0).astype(float)
        keys["n_active"] = keys["n_active"].fillna(0).astype(int)
        keys["density"] = keys["n_active"] / max(self.n_contexts, 1)
        return keys

    def dense_acts(self, layer: int, feature: int) -> np.ndarray:
        """``[N]`` activation of every context (zeros for contexts where the feature is silent)."""
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
        return ex[cols].reset_index(drop=True)

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
