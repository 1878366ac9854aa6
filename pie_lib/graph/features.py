"""Feature pages in circuit-tracer's feature schema (``frontend/feature_models.py``), one per feature.

A page is ``features/<cantor(layer, feature)>.json`` next to the graphs, with ``transcoder_id,
index, examples_quantiles[{quantile_name, examples[{tokens, tokens_acts_list, train_token_ind,
is_repeated_datapoint}]}], top_logits, bottom_logits, act_min, act_max, quantile_values,
histogram, activation_frequency``. The examples are the ones ``pie interpret`` used (streamed from
a corpus, or read from a feature store); the logits are the tokens the feature's total write
``sum_s W_dec[l][i, s-l]`` promotes / suppresses most through the unembedding, ``W_dec . W_U``
(final norm ignored, as is usual for logit lenses of this kind).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np
import torch

from pie_lib.clt.naming import cantor
from pie_lib.errors import DataFormatError
from pie_lib.store import write_json

if TYPE_CHECKING:
    from pie_lib.clt.transcoder import CrossLayerTranscoder
    from pie_lib.models.loading import LoadedModel

log = logging.getLogger("pie_lib.graph")

N_LOGITS = 10


def logit_effects(
    model: LoadedModel, clt: CrossLayerTranscoder, features: Iterable[tuple[int, int]], n: int = N_LOGITS
) -> dict[tuple[int, int], tuple[list[str], list[str]]]:
    """Top and bottom ``n`` tokens of ``W_U @ sum_s W_dec[l][i, s-l]`` per feature (one matmul per layer)."""
    W_U = model.hf.get_output_embeddings().weight.detach().float()  # pyright: ignore[reportCallIssue]  [V, D]
    tok = model.tokenizer
    by_layer: dict[int, list[int]] = {}
    for l, f in features:
        by_layer.setdefault(int(l), []).append(int(f))
    out = {}
    for l, feats in by_layer.items():
        idx = torch.tensor(sorted(set(feats)))
        write = clt.decoder_rows(l, idx.to(clt.device)).float().sum(1).to(W_U.device)  # [U, D]
        scores = write @ W_U.T  # [U, V]
        k = min(n, scores.shape[1])
        top = scores.topk(k, dim=1).indices.tolist()
        bot = (-scores).topk(k, dim=1).indices.tolist()
        for j, f in enumerate(idx.tolist()):
            out[(l, f)] = ([tok.decode([t]) for t in top[j]], [tok.decode([t]) for t in bot[j]])
    return out


def page_from_examples(
    fx: Any, active_acts: np.ndarray | None, transcoder_id: str, logits: tuple[list[str], list[str]]
) -> dict[str, Any]:
    """A feature page from Stage II's ``FeatureExamples`` (whole contexts) plus our logits.

    ``active_acts``: the feature's activations on its active contexts (all, or a uniform sample of
    them), for the page's activation quantiles and histogram."""
    from pie_lib.interpret.feature_store import record_from_examples

    return {
        "transcoder_id": transcoder_id,
        "index": cantor(fx.layer, fx.feature),
        **record_from_examples(fx, active_acts, fx.density),
        "top_logits": logits[0],
        "bottom_logits": logits[1],
    }


def page_from_record(
    record: dict[str, Any], layer: int, feature: int, transcoder_id: str, logits: tuple[list[str], list[str]]
) -> dict[str, Any]:
    """A feature-store record completed into a feature page (the logits are always ours)."""
    page = {k: record[k] for k in ("examples_quantiles", "act_min", "act_max")}
    missing = [k for k in ("quantile_values", "histogram", "activation_frequency") if k not in record]
    if missing:
        log.warning(
            "feature %d/%d: the store's record has no %s; its page shows them empty (0 for the frequency)",
            layer,
            feature,
            ", ".join(missing),
        )
    page.update(
        {
            "transcoder_id": transcoder_id,
            "index": cantor(layer, feature),
            "top_logits": logits[0],
            "bottom_logits": logits[1],
            "quantile_values": [float(x) for x in record.get("quantile_values", [])],
            "histogram": [float(x) for x in record.get("histogram", [])],
            "activation_frequency": float(record.get("activation_frequency", 0.0)),
        }
    )
    return page


def pages_from_interpret(
    interpret_dir: str | os.PathLike,
    features: list[tuple[int, int]],
    model: LoadedModel,
    clt: CrossLayerTranscoder,
    transcoder_id: str,
) -> dict[tuple[int, int], dict[str, Any]]:
    """Feature pages of ``features`` from a ``pie interpret`` output folder (whichever example source it used).

    Features the folder does not cover get no page (a warning names them).
    """
    root = Path(interpret_dir)
    cfg_path = root / "interpret_config.json"
    if not cfg_path.exists():
        raise DataFormatError(
            f"{cfg_path} is missing; --descriptions must be the descriptions.parquet of a `pie interpret` folder"
        )
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    logits = logit_effects(model, clt, features)
    pages: dict[tuple[int, int], dict[str, Any]] = {}
    missing: list[tuple[int, int]] = []
    if cfg.get("examples_source") == "store":
        from pie_lib.interpret.feature_store import FeatureStore

        store = FeatureStore.open(cfg["store"]["store"] if isinstance(cfg.get("store"), dict) else cfg["store"])
        for key in features:
            if store.has(*key):
                pages[key] = page_from_record(store.record(*key), *key, transcoder_id, logits[key])
            else:
                missing.append(key)
    else:
        import pandas as pd

        from pie_lib.interpret.examples import ActivationStore

        acts = ActivationStore(root / "examples")
        ex_path = root / "examples" / "examples.parquet"
        if not ex_path.exists():
            raise DataFormatError(f"{ex_path} is missing; rerun `pie interpret` to finish the folder")
        examples = pd.read_parquet(ex_path)
        covered = set(zip(examples["layer"].astype(int), examples["feature"].astype(int)))
        stats = acts.feature_stats([k for k in features if k in covered]) if covered else None
        for key in features:
            if key not in covered:
                missing.append(key)
                continue
            fx = acts.feature_examples(examples, *key, stats=stats)
            pages[key] = page_from_examples(fx, acts.active_acts(*key)[0], transcoder_id, logits[key])
    if missing:
        log.warning("%d feature(s) have no examples in %s, so no feature page: %s", len(missing), root, missing[:8])
    return pages


def write_feature_pages(
    interpret_dir: str | os.PathLike,
    features: list[tuple[int, int]],
    model: LoadedModel,
    clt: CrossLayerTranscoder,
    out_dir: str | os.PathLike,
    transcoder_id: str,
) -> list[Path]:
    """Write ``out_dir/<cantor>.json`` for every feature that has examples; returns the files."""
    out = Path(out_dir)
    pages = pages_from_interpret(interpret_dir, features, model, clt, transcoder_id)
    return [write_json(p, out / f"{p['index']}.json") for p in pages.values()]
