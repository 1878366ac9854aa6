"""``pie graph``: a run's circuits as graph files in circuit-tracer's schema, one per prompt.

For every selected (method, K, seed, prompt) of a ``pie prune`` folder it rebuilds the prompt from
the run's ``config.json`` (same data, task, seeds), computes the circuit's attribution graph
(:mod:`pie_lib.graph.attribution`) and writes ``<out>/<slug>.json`` with slug
``"{method}-k{K}-s{seed}-p{prompt_idx}"``, plus ``<out>/graph-metadata.json`` listing every graph
of the folder (circuit-tracer's local server reads both). With Stage II output, the nodes carry
the descriptions as ``clerp`` and ``<out>/features/<index>.json`` holds their feature pages
(:mod:`pie_lib.graph.features`), so the viewer shows each node's examples.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from pie_lib.errors import ConfigMismatchError, DataFormatError, OutputPathError, SettingError
from pie_lib.graph.attribution import GraphConfig, build_circuit_graph
from pie_lib.provenance import versions
from pie_lib.selections import latest_selections, query_selections
from pie_lib.store import write_json

if TYPE_CHECKING:
    from pie_lib.clt.transcoder import CrossLayerTranscoder
    from pie_lib.models.loading import LoadedModel

log = logging.getLogger("pie_lib.graph")

#: Graph-file schema version written into ``metadata.schema_version`` (circuit-tracer 0.5's
#: frontend unpairs ``feature`` as a Cantor index when it is > 0).
SCHEMA_VERSION = 1
#: Where the viewer fetches feature pages: ``./data/...`` is served from the graph folder.
LOCAL_FEATURES_SCAN = "./data/features"


@dataclass
class GraphRunConfig:
    """One ``pie graph`` call (field names are the CLI flags).

    Attributes:
        selections: ``selections.jsonl`` of a ``pie prune`` folder (its ``config.json`` beside it).
        method, k: which circuits; seed: which sweep seed (required when the file has several).
        prompt_idx: one prompt, or None with ``all_prompts`` for every prompt of (method, K, seed).
        descriptions: ``descriptions.parquet`` of ``pie interpret`` (node labels + feature pages).
        model, clt: override the checkpoints recorded in ``config.json``.
        model_backend: ``load_model``'s backend (auto, native, hf).
        out: output folder.
    """

    selections: str
    method: str
    k: float
    out: str
    prompt_idx: int | None = None
    all_prompts: bool = False
    seed: int | None = None
    descriptions: str | None = None
    model: str | None = None
    clt: str | None = None
    device: str | None = None
    model_backend: str = "auto"
    graph: GraphConfig = field(default_factory=GraphConfig)
    progress: bool = True


def slug_for(method: str, k: float, seed: int, prompt_idx: int) -> str:
    """``"{method}-k{K}-s{seed}-p{prompt_idx}"`` (K printed as an integer when it is one)."""
    kk = str(int(k)) if float(k).is_integer() else f"{float(k):g}"
    return f"{method}-k{kk}-s{seed}-p{prompt_idx}"


def _run_config(selections: Path) -> dict[str, Any]:
    path = selections.parent / "config.json"
    if not path.exists():
        raise DataFormatError(
            f"{path} is missing: pie graph rebuilds the prompts from the run's config.json; pass the selections.jsonl "
            "inside a `pie prune` output folder"
        )
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataFormatError(f"{path}: not valid JSON ({exc}); rerun `pie prune` to rewrite it") from None


def pick_circuits(
    records: list[dict], method: str, k: float, seed: int | None, prompt_idx: int | None, all_prompts: bool
) -> tuple[int, list[dict]]:
    """The selection records a call asks for (last write wins per prompt), and the seed they share."""
    if (prompt_idx is None) == (not all_prompts):
        raise SettingError("pass exactly one of --prompt-idx I (one prompt) or --all (every prompt)")
    latest = latest_selections(records)
    mine = query_selections(latest, methods=method, ks=k)
    if not mine:
        have = sorted({(str(r.get("method")), float(r.get("k", -1))) for r in latest})
        raise DataFormatError(
            f"no selections for --method {method} --k {k:g}; the file has (method, K) "
            + ", ".join(f"({m}, {kk:g})" for m, kk in have[:12])
        )
    seeds = sorted({int(r["seed"]) for r in mine})
    if seed is None:
        if len(seeds) > 1:
            raise SettingError(f"the selections of {method} K={k:g} have seeds {seeds}; pick one with --seed")
        seed = seeds[0]
    elif seed not in seeds:
        raise SettingError(f"--seed {seed}: the selections of {method} K={k:g} have seeds {seeds}")
    mine = sorted((r for r in mine if int(r["seed"]) == seed), key=lambda r: int(r["prompt_idx"]))
    if prompt_idx is not None:
        mine = [r for r in mine if int(r["prompt_idx"]) == prompt_idx]
        if not mine:
            raise SettingError(
                f"--prompt-idx {prompt_idx}: no selection of {method} K={k:g} seed {seed} for that prompt"
            )
    return seed, mine


def _pairs(identity: dict[str, Any], model: LoadedModel, seed: int) -> list:
    """The pairs the sweep used for ``seed`` (same rule as ``pie prune``)."""
    from pie_lib.data.pairs import load_pairs
    from pie_lib.data.tasks import generate_task

    n = identity.get("n")
    if identity.get("data"):
        return load_pairs(identity["data"], limit=n if n else None)
    data_seed = seed if identity.get("data_seed") is None else identity["data_seed"]
    if n is None:  # a task sweep always records its pair count (PruneConfig.n_pairs)
        raise DataFormatError(
            f"the sweep's config.json names task {identity.get('task')!r} but no 'n'; re-run `pie prune`"
        )
    return generate_task(identity["task"], model.tokenizer, n, seed=data_seed).pairs


def _descriptions(path: str | None) -> dict[tuple[int, int], str]:
    if path is None:
        return {}
    import pandas as pd

    p = Path(path)
    if not p.exists():
        raise DataFormatError(f"--descriptions {p} does not exist; run `pie interpret` first")
    df = pd.read_parquet(p)
    missing = {"layer", "feature", "description"} - set(df.columns)
    if missing:
        raise DataFormatError(
            f"--descriptions {p}: missing column(s) {sorted(missing)}; pass a descriptions.parquet of pie interpret"
        )
    return {
        (int(l), int(f)): str(d) for l, f, d in zip(df["layer"], df["feature"], df["description"]) if isinstance(d, str)
    }


def graph_file(graph: Any, slug: str, scan: str, prompt: str, extra_meta: dict | None = None) -> dict[str, Any]:
    """The JSON object of one graph file (circuit-tracer's ``frontend/graph_models.Model``)."""
    return {
        "metadata": {
            "slug": slug,
            "scan": scan,
            "transcoder_list": [],
            "prompt_tokens": graph.prompt_tokens,
            "prompt": prompt,
            "schema_version": SCHEMA_VERSION,
            **(extra_meta or {}),
        },
        "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""},
        "nodes": graph.nodes,
        "links": graph.links,
    }


def update_graph_metadata(out: Path, entries: list[dict]) -> Path:
    """Add (or replace, by slug) graphs in ``out/graph-metadata.json``; other graphs are kept."""
    path = out / "graph-metadata.json"
    graphs: list[dict] = []
    if path.exists():
        try:
            graphs = list(json.loads(path.read_text(encoding="utf-8")).get("graphs", []))
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            raise DataFormatError(
                f"{path} is corrupt; delete it (pie graph rewrites it for the graphs it writes)"
            ) from None
    new = {e["slug"] for e in entries}
    graphs = [g for g in graphs if g.get("slug") not in new] + entries
    return write_json({"graphs": graphs}, path)


def _check_same_checkpoints(
    run: dict[str, Any], model_path: str | None, clt_path: str | None, overridden: bool
) -> dict[str, Any]:
    """Fingerprints of the checkpoints loaded now, compared with those the run recorded.

    Without --model/--clt a difference is an error (the selections index another model's or CLT's
    features); with an override it is a warning.
    """
    from pie_lib.provenance import checkpoint_fingerprint, checkpoint_source

    now: dict[str, Any] = {
        "model_path": model_path,
        "clt_path": clt_path,
        "model_hash": checkpoint_fingerprint(model_path) if model_path else None,
        "clt_hash": checkpoint_fingerprint(clt_path) if clt_path else None,
        # hub ids with the commit they resolve to now (provenance.checkpoint_source)
        "model_source": checkpoint_source(model_path) if model_path else None,
        "clt_source": checkpoint_source(clt_path) if clt_path else None,
    }
    changed = [k for k in ("model_hash", "clt_hash") if run.get(k) and now[k] and run[k] != now[k]]
    for k in ("model_source", "clt_source"):  # a hub id now resolving to another commit than at prune time
        old_rev, new_rev = (run.get(k) or {}).get("revision"), (now[k] or {}).get("revision")
        if old_rev and new_rev and old_rev != new_rev and k not in changed:
            changed.append(k)
    if changed and not overridden:
        raise ConfigMismatchError(
            f"the {' and '.join(k.split('_')[0] for k in changed)} loaded now differ(s) from the one(s) the run recorded "
            f"in config.json ({', '.join(changed)}); rerun `pie prune`, or pass --model/--clt to build the graphs anyway"
        )
    if changed:
        log.warning("--model/--clt differ from the checkpoints of the run (%s); links use the new ones", changed)
    return now


def run_graph(
    cfg: GraphRunConfig, model: LoadedModel | None = None, clt: CrossLayerTranscoder | None = None
) -> list[Path]:
    """Write the graphs a :class:`GraphRunConfig` asks for; returns the graph files written."""
    from pie_lib.selections import read_selections

    sel_path = Path(cfg.selections)
    records = read_selections(sel_path)
    run = _run_config(sel_path)
    identity = run.get("identity", {})
    seed, chosen = pick_circuits(records, cfg.method, cfg.k, cfg.seed, cfg.prompt_idx, cfg.all_prompts)
    descriptions = _descriptions(cfg.descriptions)
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise OutputPathError(f"--out {out} is a file; pass a folder")

    model_id = cfg.model or identity.get("model") or "toy"
    clt_id = cfg.clt or identity.get("clt") or "toy"
    if model is None or clt is None:
        from pie_lib.world import load_world

        world = load_world(model or model_id, clt or clt_id, device=cfg.device, backend=cfg.model_backend)
        model, clt = world.model, world.clt
        loaded = _check_same_checkpoints(run, world.model_path, world.clt_path, overridden=bool(cfg.model or cfg.clt))
    else:
        loaded = {"model": "in-memory", "clt": "in-memory"}
    pairs = _pairs(identity, model, seed)
    scan = LOCAL_FEATURES_SCAN if cfg.descriptions else str(clt_id)
    out.mkdir(parents=True, exist_ok=True)
    written, entries = [], []
    for rec in tqdm(chosen, desc="pie graph", disable=not cfg.progress, unit="graph"):
        p_idx = int(rec["prompt_idx"])
        if not 0 <= p_idx < len(pairs):
            raise DataFormatError(
                f"selection prompt_idx {p_idx} is outside the run's {len(pairs)} pairs; "
                "was config.json rewritten by another run?"
            )
        pair = pairs[p_idx]
        ids = model.tokenize([pair.text_clean])[0]
        import torch

        g = build_circuit_graph(
            model,
            clt,
            torch.tensor(ids),
            rec["occurrences"],
            model.target_token(pair.io_clean),
            model.target_token(pair.s_clean),
            cfg.graph,
            descriptions,
        )
        slug = slug_for(cfg.method, cfg.k, seed, p_idx)
        obj = graph_file(g, slug, scan, pair.text_clean)
        written.append(write_json(obj, out / f"{slug}.json"))
        entries.append(
            {k: obj["metadata"][k] for k in ("slug", "scan", "prompt_tokens", "prompt", "schema_version")}
            | {"transcoder_list": [], "title_prefix": f"{cfg.method} K={cfg.k:g}"}
        )
    update_graph_metadata(out, entries)
    write_json(
        {
            "selections": str(sel_path),
            "method": cfg.method,
            "k": cfg.k,
            "seed": seed,
            "model": model_id,
            "clt": clt_id,
            "edge_threshold": cfg.graph.edge_threshold,
            "descriptions": cfg.descriptions,
            "loaded": loaded,
            "run_config": {
                k: run.get(k)
                for k in ("model_path", "clt_path", "model_hash", "clt_hash", "model_source", "clt_source")
            },
            "versions": versions(),
            "run_versions": run.get("versions"),
        },
        out / "graph_config.json",
    )
    if cfg.descriptions:
        from pie_lib.graph.features import write_feature_pages

        feats = sorted({(int(l), int(f)) for r in chosen for l, _p, f in r["occurrences"]})
        write_feature_pages(
            Path(cfg.descriptions).parent, feats, model, clt, out / "features", transcoder_id=str(clt_id)
        )
    return written


__all__ = [
    "GraphRunConfig",
    "SCHEMA_VERSION",
    "graph_file",
    "pick_circuits",
    "run_graph",
    "slug_for",
    "update_graph_metadata",
]
