"""Stage II, Interpret: selections in, ``descriptions.parquet`` out.

Flow of :func:`interpret`: read the selections written by ``pie prune`` -> the union over prompts
of kept (layer, feature) pairs -> activation examples over a corpus (:mod:`.examples`) -> one
description per feature (:mod:`.explainers`). Every finished feature is written at once
(``descriptions/rows/L<layer>_F<feature>.json``), so an interrupted or failing run loses nothing
and a rerun only does what is missing (features whose request failed are retried).
"""

from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Sequence, cast

import pandas as pd
from tqdm.auto import tqdm

from pie_lib.clt.transcoder import CrossLayerTranscoder
from pie_lib.errors import DataFormatError
from pie_lib.interpret.corpus import CorpusConfig
from pie_lib.interpret.examples import (
    ActivationStore,
    ExampleConfig,
    FeatureKey,
)
from pie_lib.interpret.explainers import ExplainConfig, Explanation, make_explainer
from pie_lib.llm import LLMConfig
from pie_lib.models.loading import LoadedModel
from pie_lib.selections import query_selections, read_selections
from pie_lib.store import check_same_config, read_config, write_json, write_parquet

log = logging.getLogger("pie_lib.interpret")

DESCRIPTION_COLUMNS = [
    "layer",
    "feature",
    "description",
    "status",
    "parse_failures",
    "calls",
    "prompt_tokens",
    "completion_tokens",
    "cache_hits",
    "backend",
    "llm_model",
    "n_examples",
    "max_act",
    "n_active",
    "density",
    "n_circuits",
    "error",
]
FINAL_STATUSES = ("ok", "parse_failed", "no_examples")


@dataclass
class InterpretConfig:
    """Everything :func:`interpret` can be told (the CLI flags map onto these fields)."""

    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    examples: ExampleConfig = field(default_factory=ExampleConfig)
    explain: ExplainConfig = field(default_factory=ExplainConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    max_features: int | None = None  # explain only the first N features (smoke runs)


# --------------------------------------------------------------------------- selections
def features_from_selections(
    selections: Sequence[dict] | str | os.PathLike,
    method: str | None = None,
    k: int | None = None,
    seed: int | None = None,
) -> pd.DataFrame:
    """The features to explain: the union over prompts of kept (layer, feature) pairs (spec §7).

    Args:
        selections: the records of :func:`read_selections` (or its path).
        method, k, seed: keep only records with these values (None: all).
    Returns:
        layer, feature, n_circuits (how many selections -- circuits -- contain the feature).
    """
    recs = read_selections(selections) if isinstance(selections, (str, os.PathLike)) else list(selections)
    rows = []
    for i, r in enumerate(query_selections(recs, methods=method, ks=k, seeds=seed)):
        for layer, _pos, feat in r["occurrences"]:
            rows.append((int(layer), int(feat), i))
    if not rows:
        raise DataFormatError(
            f"no selections match method={method!r} k={k!r} seed={seed!r}; "
            f"available: {sorted({(r.get('method'), r.get('k')) for r in recs})}"
        )
    df = pd.DataFrame(rows, columns=["layer", "feature", "circuit"]).drop_duplicates()
    sizes = cast(pd.Series, df.groupby(["layer", "feature"]).size())  # a Series for a DataFrame groupby
    return sizes.rename("n_circuits").reset_index()


# --------------------------------------------------------------------------- world
def resolve_world(
    model: str | os.PathLike | LoadedModel | None = None,
    clt: str | os.PathLike | CrossLayerTranscoder | None = None,
    device: str | None = None,
    remote: bool | str = False,
    arch: str = "llama",
    model_backend: str = "auto",
) -> tuple[LoadedModel, CrossLayerTranscoder, dict[str, Any]]:
    """Load model and CLT (default: the toy world's ``arch``, with ``load_model``'s ``backend=model_backend``);
    return them and their identity."""
    from pie_lib.world import load_world, resolve_checkpoint

    model = Path(resolve_checkpoint(f"toy:{arch}", "model")) if model is None else model
    clt = Path(resolve_checkpoint(f"toy:{arch}", "clt")) if clt is None else clt
    world = load_world(model, clt, device=device, remote=remote, backend=model_backend)
    identity = {
        "model": str(model if not isinstance(model, LoadedModel) else model.name),
        "clt": str(clt) if isinstance(clt, (str, os.PathLike)) else "in-memory",
    }
    return world.model, world.clt, identity


# --------------------------------------------------------------------------- rows
def _row(e: Explanation, stats: dict, n_circuits: int, backend: str, model: str) -> dict:
    return {
        "layer": e.layer,
        "feature": e.feature,
        "description": e.description,
        "status": e.status,
        "parse_failures": e.parse_failures,
        **{k: v for k, v in e.usage.to_dict().items()},
        "backend": backend,
        "llm_model": model,
        "n_examples": e.n_examples,
        "max_act": float(stats.get("max_act", 0.0)),
        "n_active": int(stats.get("n_active", 0)),
        "density": float(stats.get("density", 0.0)),
        "n_circuits": int(n_circuits),
        "error": e.error,
    }


def _row_path(rows_dir: Path, layer: int, feature: int) -> Path:
    return rows_dir / f"L{layer}_F{feature}.json"


def collect_rows(rows_dir: Path, keys: Iterable[FeatureKey] | None = None) -> pd.DataFrame:
    """The per-feature row files of a run, as one table (only ``keys`` when given)."""
    rows = []
    wanted = set(keys) if keys is not None else None
    for p in sorted(rows_dir.glob("L*_F*.json")):
        r = json.loads(p.read_text())
        if wanted is None or (r["layer"], r["feature"]) in wanted:
            rows.append(r)
    return pd.DataFrame(rows)


def check_settings(path: Path, settings: dict) -> None:
    """Refuse to mix rows produced under different settings in one output folder; record them if new."""
    check_same_config(
        read_config(path, "pie interpret"),
        settings,
        f"{path.parent} holds results made with other {{keys}} settings; "
        "pass a fresh --out folder (or delete that one) to use the new settings",
    )
    if not path.exists():
        write_json(settings, path, indent=1, default=str)


# --------------------------------------------------------------------------- main entry
def interpret(
    selections: str | os.PathLike | Sequence[dict] | None = None,
    *,
    features: Iterable[FeatureKey] | None = None,
    method: str | None = None,
    k: int | None = None,
    model: str | os.PathLike | LoadedModel | None = None,
    clt: str | os.PathLike | CrossLayerTranscoder | None = None,
    device: str | None = None,
    remote: bool | str = False,
    model_backend: str = "auto",
    corpus: str | CorpusConfig | None = "toy",
    backend: str | None = None,
    llm: LLMConfig | None = None,
    out: str | os.PathLike = "pie_out/interpret",
    config: InterpretConfig | None = None,
    progress: bool = True,
    examples_source: str = "corpus",
    store: str | os.PathLike | None = None,
) -> pd.DataFrame:
    """Describe every feature of the selected circuits.

    Args:
        selections: ``selections.jsonl`` of ``pie prune`` (or its records); or pass ``features``.
        features: explicit (layer, feature) pairs instead of selections.
        method, k: filter the selections.
        model, clt: paths / hub ids or loaded objects; default the toy world (llama).
        device, remote: where the model runs (``remote`` is passed to every nnsight trace).
        corpus: "toy", a .txt / .jsonl path, a Hugging Face dataset name, or a CorpusConfig.
        backend: "offline" (default), "openai" or "hf" (shorthand for ``llm.backend``).
        llm: full LLM settings; the API key comes from the environment and is never written.
        out: output folder (resumable).
    Returns:
        The descriptions table (also written to ``out/descriptions.parquet``), one row per feature
        with columns :data:`DESCRIPTION_COLUMNS`.
    """
    cfg = replace(config) if config is not None else InterpretConfig()  # the caller's config is not modified
    if isinstance(corpus, CorpusConfig):
        cfg.corpus = corpus
    elif corpus is not None:
        cfg.corpus = replace(cfg.corpus, source=str(corpus))
    llm_cfg = replace(llm or cfg.llm)  # a copy: the caller's config is not modified
    if backend is not None:
        llm_cfg.backend = backend  # type: ignore[assignment]
    out = Path(out)
    if llm_cfg.backend != "offline" and llm_cfg.cache_dir is None:
        llm_cfg.cache_dir = out / "llm_cache"
    llm_cfg = llm_cfg.resolved()

    if features is not None:
        feats = pd.DataFrame(sorted({(int(l), int(f)) for l, f in features}), columns=["layer", "feature"]).assign(
            n_circuits=0
        )
    elif selections is not None:
        feats = features_from_selections(selections, method=method, k=k)
    else:
        raise DataFormatError("interpret needs --selections (from `pie prune`) or an explicit feature list")
    if cfg.max_features is not None:
        feats = feats.head(cfg.max_features)
    keys = [(int(l), int(f)) for l, f in zip(feats["layer"], feats["feature"])]

    lm, tc, identity = resolve_world(model, clt, device, remote, model_backend=model_backend)
    if selections is not None and isinstance(selections, (str, os.PathLike)):
        from pie_lib.provenance import check_same_world

        # selections of another model or CLT would name features that mean something else here
        check_same_world(selections, identity["model"], None if identity["clt"] == "in-memory" else identity["clt"])
    bad = [(l, f) for l, f in keys if not (0 <= l < tc.n_layers and 0 <= f < tc.n_features)]
    if bad:
        raise DataFormatError(
            f"feature(s) {bad[:5]} do not exist in this CLT ({tc.n_layers} layers x {tc.n_features} features); "
            "were the selections made with another CLT?"
        )
    from_store = None
    if examples_source == "store":  # precomputed examples (the reference's Stage II); records checked here
        from pie_lib.interpret.feature_store import FeatureStore, StoreExamples, default_store_for

        from_store = StoreExamples(FeatureStore.open(store if store is not None else default_store_for(clt)), keys)
    elif examples_source != "corpus":
        raise DataFormatError(f"--examples {examples_source!r}: use 'corpus' or 'store'")
    # nothing is written before the inputs have been checked
    out.mkdir(parents=True, exist_ok=True)
    write_parquet(feats, out / "features.parquet")
    write_json(
        {
            **identity,
            "device": str(lm.device),
            "remote": remote,
            "selections": None
            if selections is None or not isinstance(selections, (str, os.PathLike))
            else str(selections),
            "method": method,
            "k": k,
            "corpus": asdict(cfg.corpus),
            "examples": asdict(cfg.examples),
            "explain": asdict(cfg.explain),
            "llm": llm_cfg.public(),
            "examples_source": examples_source,
            "store": from_store.store.provenance if from_store is not None else None,
        },
        out / "interpret_config.json",
        indent=1,
        default=str,
    )

    act_store: ActivationStore | None = None  # the corpus store (None when examples come from a feature store)
    if from_store is None:
        act_store = ActivationStore.build(lm, tc, keys, out / "examples", cfg.corpus, cfg.examples, identity, progress)
        examples = act_store.select_examples(keys, cfg.examples)
        write_parquet(examples, out / "examples" / "examples.parquet")
        stats_df = act_store.feature_stats(keys)
    else:
        examples = pd.DataFrame({"layer": [], "feature": []})
        stats_df = from_store.feature_stats(keys)
    stats = stats_df.set_index(["layer", "feature"])

    explainer = make_explainer(llm_cfg, cfg.explain)
    rows_dir = out / "descriptions" / "rows"
    rows_dir.mkdir(parents=True, exist_ok=True)
    check_settings(
        out / "descriptions" / "config.json",
        {"explain": asdict(cfg.explain), "examples": asdict(cfg.examples)}
        | ({"examples_source": "store", "store": from_store.store.provenance} if from_store is not None else {}),
    )
    n_circ = dict(zip(keys, feats["n_circuits"].astype(int)))
    todo = []
    for key in keys:
        p = _row_path(rows_dir, *key)
        if p.exists():
            r = json.loads(p.read_text())
            if (
                r["status"] in FINAL_STATUSES
                and r["backend"] == explainer.backend
                and r["llm_model"] == explainer.model
            ):
                continue
        todo.append(key)

    stats_rows = {(int(l), int(f)): r for (l, f), r in stats.to_dict("index").items()}
    examples.attrs["_groups"] = examples.groupby(["layer", "feature"]).indices if len(examples) else {}

    def work(key: FeatureKey) -> dict:
        if from_store is not None:
            fx = from_store.feature_examples(*key)
        else:
            assert act_store is not None  # built above whenever from_store is None
            fx = act_store.feature_examples(
                examples,
                *key,
                stats=cast(pd.DataFrame, stats_df[(stats_df.layer == key[0]) & (stats_df.feature == key[1])]),
            )
        e = explainer.explain(fx)
        row = _row(e, stats_rows[key], n_circ[key], explainer.backend, explainer.model)
        write_json(row, _row_path(rows_dir, *key), indent=1, default=str)
        return row

    n_failed = 0
    bar = tqdm(total=len(todo), desc=f"explain ({explainer.backend})", disable=not progress, unit="feature")
    if llm_cfg.workers > 1 and len(todo) > 1:
        with ThreadPoolExecutor(max_workers=llm_cfg.workers) as pool:
            for fut in as_completed([pool.submit(work, key) for key in todo]):
                n_failed += fut.result()["status"] == "request_failed"
                bar.update()
    else:
        for key in todo:
            n_failed += work(key)["status"] == "request_failed"
            bar.update()
    bar.close()
    if n_failed:
        log.warning(
            "%d of %d features could not be explained (request failures); rerun to retry them", n_failed, len(todo)
        )

    table = collect_rows(rows_dir, keys)
    table = cast(pd.DataFrame, table[DESCRIPTION_COLUMNS]).sort_values(["layer", "feature"]).reset_index(drop=True)
    write_parquet(table, out / "descriptions.parquet")
    return table
