"""Resumable sweeps over methods × K ladder × seeds, persisted per batch as rows finish.

Output folder layout::

    DIR/config.json        what produced the rows (identity fields, versions, checkpoint hashes)
    DIR/results.jsonl      one row per (method, k, seed, prompt_idx), appended as batches finish
    DIR/results.parquet    the same rows, rewritten atomically at the end of each run
    DIR/selections.jsonl   kept occurrences [layer, position, feature] and their scores per row
    DIR/selections.parquet the same, one row per kept occurrence (pie_lib.selections.SELECTION_COLUMNS)

Rerunning the same command skips every finished row: kill it midway, rerun, nothing is lost or
recomputed. Adding methods, budgets or seeds to a finished folder computes only the new rows; a
different model, CLT, data set or scoring configuration is refused (use a new ``--out``).
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, cast

import torch
from tqdm.auto import tqdm

from pie_lib.clt.transcoder import CrossLayerTranscoder
from pie_lib.data.pairs import Pair
from pie_lib.engine.remote import is_remote, request_summary, server_dtype
from pie_lib.errors import (
    DataFormatError,
    OutputPathError,
    SettingError,
)
from pie_lib.models.loading import LoadedModel
from pie_lib.prune.config import PruneConfig  # noqa: F401 (re-exported: its old home)
from pie_lib.prune.context import BatchContext, ScoringConfig  # noqa: F401 (re-exported)
from pie_lib.prune.inputs import (
    DEFAULT_TASK_PAIRS,
    InputReport,
    check_distinct,
    check_writable,
    checkpoint_sources,
    pairs_of_file,
)
from pie_lib.prune.occurrences import TokenizedPairs, tokenize_pairs
from pie_lib.prune.params import MethodParams  # noqa: F401 (re-exported)
from pie_lib.prune.registry import Method, get_methods
from pie_lib.prune.results import (  # noqa: F401 (re-exported)
    RESULT_COLUMNS,
    finish_folder,
    finish_rows,
    load_results,
    load_selections,
    results_frame,
)
from pie_lib.prune.retention import evaluate_keep_masks
from pie_lib.prune.shard import (
    Shard,
    Unit,
    assign,
    has_shards,
    merge_shards,
    parse_shard,
    plan_record,
    plan_units,
    shard_folder,
)
from pie_lib.selections import budget_label
from pie_lib.store import (
    append_jsonl,
    check_same_config,
    own_folder,
    read_config,
    read_jsonl,
    remove_stale_temps,
    write_json,
)
from pie_lib.world import load_world, resolve_checkpoints

if TYPE_CHECKING:
    import pandas as pd  # only for callers that ask for a DataFrame (~0.3 s to import)

    from pie_lib.data.tasks import Task

log = logging.getLogger(__name__)

from pie_lib.prune.defaults import DEFAULT_LADDER, DEFAULT_METHODS  # noqa: E402,F401 (re-exported)


def _pairs_for_seed(cfg: PruneConfig, model: LoadedModel, seed: int) -> list[Pair]:
    if cfg.data:
        return pairs_of_file(cfg.data, cfg.n, say=lambda _: None)[0]
    from pie_lib.data.tasks import generate_task

    data_seed = seed if cfg.data_seed is None else cfg.data_seed
    return generate_task(
        cast("Task", cfg.task), model.tokenizer, cfg.n_pairs or DEFAULT_TASK_PAIRS, seed=data_seed
    ).pairs


def _check_out(out: Path) -> None:
    """The output folder must be a folder (or creatable as one)."""
    if out.exists() and not out.is_dir():
        raise OutputPathError(f"--out {out} is a file; pass a folder (it is created if missing)")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputPathError(f"--out {out}: {parent} is a file, not a directory; pass another folder")
            break


def _check_config(out: Path, cfg: PruneConfig, fingerprints: dict[str, str | None] | None = None) -> None:
    """Refuse a folder whose rows came from another configuration or other checkpoint / data contents."""
    stored = read_config(out / "config.json", "pie prune")
    if stored is None:
        return
    check_same_config(
        stored.get("identity", {}),
        cfg.identity(),
        f"{out} holds results of a different configuration (differs in {{keys}}); "
        "use a new --out folder, or delete the old one to start over",
    )
    fingerprints = fingerprints or {}
    check_same_config(
        stored,
        fingerprints,
        f"{out} holds results of other file contents: {{keys}} differ (the model, CLT or data at the same "
        "path changed since its rows were written); use a new --out folder, or delete the old one to start over",
        keys=[k for k in fingerprints if k in stored],
    )


@dataclass(frozen=True)
class _Checked:
    """What ``run_prune`` checked before loading or writing anything."""

    methods: list[Method]
    ladder: list[tuple[str, float]]
    out: Path
    shard: Shard | None
    folder: Path  # where this run writes (a shard's own folder; shards never share a file)
    file_pairs: list[Pair] | None
    model_path: str
    clt_path: str
    fingerprints: dict[str, str | None]
    report: InputReport  # filled while the pairs are tokenized; stored in config.json


def _check_run(cfg: PruneConfig) -> _Checked:
    """Step 1: everything that can be checked, before anything is loaded or written (bad input
    leaves no output folder behind, or an existing one untouched)."""
    from pie_lib.provenance import checkpoint_fingerprint, file_sha256

    methods = get_methods(cfg.methods)
    ladder = cfg.ladder()
    cfg.validate()
    check_writable(cfg.out)
    out = Path(cfg.out)
    _check_out(out)
    shard = parse_shard(cfg.shard)
    folder = shard_folder(out, shard) if shard else out
    report = InputReport(target_token=cfg.target_token, cut_corrupted=cfg.cut_corrupted)
    file_pairs = None
    if cfg.data:
        file_pairs, report.n_pairs_in_file = pairs_of_file(cfg.data, cfg.n)
    model_path, clt_path = resolve_checkpoints(cfg.model, cfg.clt)
    fingerprints = {
        "model_hash": checkpoint_fingerprint(model_path),
        "clt_hash": checkpoint_fingerprint(clt_path),
        "data_sha256": file_sha256(cfg.data) if cfg.data else None,
    }
    _check_config(out, cfg, fingerprints)
    if shard:
        _check_config(folder, cfg, fingerprints)
    return _Checked(methods, ladder, out, shard, folder, file_pairs, model_path, clt_path, fingerprints, report)


PairGroup = tuple[list[int], list[Pair]]  # seeds sharing these prompts, the prompts


def _tokenized_groups(
    cfg: PruneConfig, model: LoadedModel, file_pairs: list[Pair] | None, report: InputReport
) -> tuple[list[PairGroup], list[tuple[list[int], TokenizedPairs]]]:
    """Step 2: the prompts of every seed, tokenized into batches.

    When every seed sees the same prompts (a data file, or a fixed data_seed), one group serves
    all seeds and seed-independent methods are selected and evaluated once.
    """
    shared = cfg.data is not None or cfg.data_seed is not None
    groups: list[PairGroup] = (
        [(list(cfg.seeds), file_pairs or _pairs_for_seed(cfg, model, cfg.seeds[0]))]
        if shared
        else [([s], _pairs_for_seed(cfg, model, s)) for s in cfg.seeds]
    )
    flags = {"target_token": cfg.target_token, "cut_corrupted": cfg.cut_corrupted}
    tokenized = [
        (seeds, tokenize_pairs(model, pairs, batch_size=cfg.batch_size, min_tokens=cfg.min_tokens, **flags))
        for seeds, pairs in groups
    ]
    for (seeds, pairs), (_, tok) in zip(groups, tokenized):
        if not tok.batches:
            first = next(iter(tok.skipped.items()), (None, "no pairs"))
            raise DataFormatError(
                f"no usable pairs for seeds {seeds}: all {len(pairs)} pair(s) were skipped (e.g. pair {first[0]}: "
                f"{first[1]}); use longer prompts or a lower --min-tokens"
            )
        if cfg.scoring.corruption == "corrupted":
            check_distinct(tok, pairs)
        report.add(tok)
    report.n_pairs = len(groups[0][1])
    return groups, tokenized


class _RunFolder:
    """Step 3: the run's output folder -- created, and its config.json (re)written, just before the
    first rows are written; rows are appended selections first (a row is finished once its result
    is written)."""

    def __init__(self, cfg: PruneConfig, checked: _Checked, units: list[Unit], sources: dict[str, Any]) -> None:
        self.cfg, self.checked, self.units, self.sources = cfg, checked, units, sources
        self.res_path = checked.folder / "results.jsonl"
        self.sel_path = checked.folder / "selections.jsonl"
        self.started = False

    def start(self) -> None:
        if self.started:
            return
        from pie_lib.provenance import versions

        c, cfg, folder = self.checked, self.cfg, self.checked.folder
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputPathError(f"--out {c.out}: cannot create the folder ({exc.strerror or exc})") from None
        # left by a kill during an atomic write
        remove_stale_temps(folder, ["config.json", "results.parquet", "selections.parquet"])
        if c.shard:
            labels = [lab for lab, _ in c.ladder]
            write_json(plan_record(self.units, c.shard.count, cfg.methods, labels), folder / "plan.json")
        write_json(
            {
                "identity": cfg.identity(),
                "methods": cfg.methods,
                "k": cfg.k,
                "k_frac": cfg.k_frac,
                "seeds": cfg.seeds,
                "versions": versions(),
                "model_path": c.model_path,
                "clt_path": c.clt_path,
                **self.sources,
                **c.fingerprints,
                "inputs": c.report.to_json(),
                **({"shard": str(c.shard)} if c.shard else {}),
            },
            folder / "config.json",
        )
        self.started = True

    def append(self, rows: list[dict[str, Any]], sels: list[dict[str, Any]]) -> None:
        self.start()
        append_jsonl(self.sel_path, sels)
        append_jsonl(self.res_path, rows)


Todo = dict[int, list[tuple[Method, str, float]]]  # seed -> (method, K label, K value) not finished yet


def _todo(methods: list[Method], ladder: list[tuple[str, float]], seeds: list[int], pidx: list[int], done: set) -> Todo:
    """The (method, K) cells of each seed with at least one prompt of the batch not finished."""
    return {
        seed: [
            (m, lab, val)
            for m in methods
            for lab, val in ladder
            if any((m.name, lab, seed, p) not in done for p in pidx)
        ]
        for seed in seeds
    }


def _prune_batch(
    ctx: BatchContext, todo: Todo, cfg: PruneConfig, done: set, task: str, prompt_ids: list[str], t0: float
) -> Iterator[tuple[list[dict[str, Any]], list[dict[str, Any]], int]]:
    """Step 4: select and evaluate every unfinished (method, K, seed) of one batch.

    Yields, seed by seed (so a seed's rows are written before the next seed is computed): its
    result rows, selection records, and how many (prompt, K) budgets were clipped to the active set.
    """
    counts = ctx.occ.counts().cpu()
    pidx = ctx.batch.prompt_idx.tolist()
    # (method, K label, seed or None for seed-independent methods) -> its outcome, so a
    # deterministic method is selected and evaluated once however many seeds share the prompts
    outcomes: dict[tuple[str, str, int | None], _Outcome] = {}
    for seed, cells in todo.items():
        if not cells:
            continue
        wanted = [(m, lab, val, (m.name, lab, seed if m.seeded else None)) for m, lab, val in cells]
        todo_cells = [(m, key, _budgets(lab, val, counts)) for m, lab, val, key in wanted if key not in outcomes]
        for m in {m.name: m for m, _, _ in todo_cells if m.prefetch is not None}.values():
            # one round of shared forwards for all of this method's budgets (e.g. FAP-Synergy's M(.))
            m.prefetch(ctx, [kv for mm, _, kv in todo_cells if mm is m], seed, cfg.params)  # pyright: ignore[reportOptionalCall]
        selected = []
        clipped = 0
        for m, key, kv in todo_cells:
            clipped += int((kv > counts).sum())
            selected.append((key, *m.select(ctx, kv, seed, cfg.params), kv))
        if selected:
            ev = evaluate_keep_masks(ctx, torch.stack([x[1] for x in selected]))
            for j, (key, keep, sc, kv) in enumerate(selected):
                outcomes[key] = _Outcome(keep, sc, {n: (v[j] if v.dim() == 2 else v) for n, v in ev.items()}, kv)
        secs = (time.perf_counter() - t0) / ctx.batch.size
        rows: list[dict[str, Any]] = []
        sels: list[dict[str, Any]] = []
        for m, lab, _, key in wanted:
            r, sl = _rows(outcomes[key], ctx, m.name, lab, seed, pidx, done, task, secs, prompt_ids)
            rows += r
            sels += sl
        yield rows, sels, clipped


def run_prune(
    cfg: PruneConfig, model: LoadedModel | None = None, clt: CrossLayerTranscoder | None = None
) -> pd.DataFrame:
    """Run (or resume) a sweep and return every row of the folder as a DataFrame.

    The steps: :func:`_check_run` (nothing loaded or written yet) -> load the model and CLT ->
    :func:`_tokenized_groups` -> per batch :func:`_prune_batch`, its rows appended by
    :class:`_RunFolder` -> :func:`finish_rows` (the parquet files).

    Args:
        cfg: the run; model / clt: already-loaded objects (else loaded from ``cfg``).
    """
    return results_frame(run_prune_rows(cfg, model, clt))


def run_prune_rows(
    cfg: PruneConfig, model: LoadedModel | None = None, clt: CrossLayerTranscoder | None = None
) -> list[dict[str, Any]]:
    """:func:`run_prune`, its rows as :data:`RESULT_COLUMNS` dicts (no pandas: ``pie prune``)."""
    checked = _check_run(cfg)
    world = load_world(
        model or checked.model_path,
        clt or checked.clt_path,
        device=cfg.device,
        dtype=cfg.dtype,
        remote=cfg.remote,
        backend=cfg.model_backend,
    )
    model, clt = world.model, world.clt
    requests_before = request_summary()
    remote_info = _remote_check(model, cfg) if is_remote(model) else None
    groups, tokenized = _tokenized_groups(cfg, model, checked.file_pairs, checked.report)
    for line in checked.report.lines():
        print(line)
    sources = checkpoint_sources(cfg.model, checked.model_path, cfg.clt, checked.clt_path)
    # one writer per (out, shard): a second live run on it is refused, a killed run's lock taken over
    with own_folder(checked.folder, shard=str(checked.shard) if checked.shard else None):
        return _sweep(cfg, checked, model, clt, groups, tokenized, sources, remote_info, requests_before)


def _sweep(
    cfg: PruneConfig,
    checked: _Checked,
    model: LoadedModel,
    clt: CrossLayerTranscoder,
    groups: list[PairGroup],
    tokenized: list[tuple[list[int], TokenizedPairs]],
    sources: dict[str, Any],
    remote_info: dict[str, Any] | None,
    requests_before: dict[str, Any],
) -> list[dict[str, Any]]:
    """Steps 3-4 in the folder this run holds: every missing row, then the parquet files."""
    shard = checked.shard
    units = plan_units(tokenized)
    owners = assign(units, shard.count) if shard else [0] * len(units)
    if not shard and has_shards(checked.out):  # a later unsharded run takes in what shards computed
        merge_shards(checked.out, require_complete=False)
    folder = _RunFolder(cfg, checked, units, sources)
    done = _finished_rows(folder.res_path)
    task_name = "data" if cfg.data else cfg.task
    clipped = 0
    unit_owner = iter(owners)
    for (seeds, tok), (_, group_pairs) in zip(tokenized, groups):
        # the pair's identity beside its index, so statistics can tell shared prompts from seed-specific ones
        ids = [pair.prompt_id() for pair in group_pairs]
        for batch in tqdm(tok.batches, desc=f"prune seeds {seeds}", disable=not cfg.progress, unit="batch"):
            if shard and next(unit_owner) != shard.index:
                continue  # another shard's batch
            todo = _todo(checked.methods, checked.ladder, seeds, batch.prompt_idx.tolist(), done)
            if not any(todo.values()):
                continue
            t0 = time.perf_counter()
            ctx = BatchContext(model, clt, batch, cfg.scoring)
            for rows, sels, n_clipped in _prune_batch(ctx, todo, cfg, done, task_name, ids, t0):
                clipped += n_clipped
                folder.append(rows, sels)
                done.update((r["method"], budget_label(r), r["seed"], r["prompt_idx"]) for r in rows)
    if clipped:
        warnings.warn(f"{clipped} (prompt, K) budgets exceeded the active set and were clipped to it (k_eff < k)")
    folder.start()  # also when every row was already there
    if remote_info is not None:
        _record_remote(checked.folder, remote_info, requests_before)
    return finish_rows(checked.folder)


def _remote_check(model: LoadedModel, cfg: PruneConfig) -> dict[str, Any]:
    """The server's precision (probed once), checked against --dtype and FAP-Synergy's need for float32."""
    dt = str(server_dtype(model)).removeprefix("torch.")
    if cfg.dtype is not None and str(cfg.dtype).removeprefix("torch.") != dt:
        raise SettingError(
            f"--dtype {cfg.dtype}: the NDIF deployment of {cfg.model} runs in {dt}, which a client cannot change; "
            f"drop --dtype (or pass --dtype {dt}), or run locally"
        )
    synergy_f32 = dt == "float32"
    if "fap-synergy" in cfg.methods and not synergy_f32:
        if cfg.params.synergy.precision == "float32":  # refused now, not after the first batches
            raise SettingError(
                f"FAP-Synergy's M(.) forwards must run in float32 (--synergy-precision float32), but the NDIF "
                f"deployment of {cfg.model} runs in {dt}; use a float32 deployment, run locally, or pass "
                "--synergy-precision model (recorded in config.json)"
            )
        warnings.warn(
            f"FAP-Synergy's M(.) evaluations run in {dt} on this server (--synergy-precision model), not float32: "
            "its selections can differ from a float32 run on 10-25% of prompts (recorded in config.json)"
        )
    return {"server_dtype": dt, "synergy_m_float32": synergy_f32 if "fap-synergy" in cfg.methods else None}


def _record_remote(folder: Path, info: dict[str, Any], before: dict[str, Any]) -> None:
    """Add the server's precision and this run's requests (total and by kind) to ``config.json``."""
    import json

    now = request_summary()
    kinds = {k: n - before["by_kind"].get(k, 0) for k, n in now["by_kind"].items()}
    path = folder / "config.json"
    cfg = json.loads(path.read_text(encoding="utf-8"))
    cfg["remote"] = {
        **info,
        "requests": now["total"] - before["total"],
        "by_kind": {k: n for k, n in kinds.items() if n},
    }
    write_json(cfg, path)


@dataclass
class _Outcome:
    """One (method, K) selection of a batch and its evaluation (``ev`` values are ``[B]``)."""

    keep: torch.Tensor
    scores: torch.Tensor
    ev: dict[str, torch.Tensor]
    budgets: torch.Tensor


def _budgets(label: str, value: float, counts: torch.Tensor) -> torch.Tensor:
    """``[B]`` budget per prompt: K itself, or ceil(fraction × active set) for a fraction ladder."""
    if label.startswith("f"):
        return torch.clamp(torch.ceil(value * counts.double()).long(), min=1)
    return torch.full((counts.numel(),), int(value), dtype=torch.long)


def _rows(
    o: _Outcome,
    ctx: BatchContext,
    name: str,
    label: str,
    seed: int,
    pidx: list[int],
    done: set,
    task: str,
    secs: float,
    ids: list[str],
) -> tuple[list[dict], list[dict]]:
    """Result rows and selection records of one outcome, for the prompts not finished yet."""
    rows, sels = [], []
    # plain Python values once per outcome (not one tensor read per prompt and column)
    ev = {k: v.tolist() for k, v in o.ev.items()}
    budgets = o.budgets.tolist()
    kept_all = o.keep.nonzero().squeeze(-1)  # [n kept], sorted, so grouped by prompt
    kept_prompt = ctx.occ.prompt.cpu()[kept_all]
    bounds = torch.searchsorted(kept_prompt, torch.arange(len(pidx) + 1)).tolist()
    triples = ctx.occ.triples(kept_all)
    scores = [round(x, 7) for x in o.scores[kept_all].tolist()]
    base = {"method": name, "k": _k_value(label), "budget": "frac" if label.startswith("f") else "abs", "seed": seed}
    for b, p in enumerate(pidx):
        if (name, label, seed, p) in done:
            continue
        n_active = int(ev["n_active"][b])
        rows.append(
            {
                **base,
                "prompt_idx": p,
                "prompt_id": ids[p],
                "n_active": n_active,
                "k_eff": int(min(budgets[b], n_active)),
                "n_kept": int(ev["n_kept"][b]),
                "kl": float(ev["kl"][b]),
                "pred_change": bool(ev["pred_change"][b]),
                "faithfulness": float(ev["faithfulness"][b]),
                "completeness": float(ev["completeness"][b]),
                "m_clean": float(ev["m_clean"][b]),
                "m_null": float(ev["m_null"][b]),
                "m_circuit": float(ev["m_circuit"][b]),
                "m_complement": float(ev["m_complement"][b]),
                "kl_null": float(ev["kl_null"][b]),
                "task": task,
                "seconds": secs,
            }
        )
        lo, hi = bounds[b], bounds[b + 1]
        sels.append(
            {
                **base,
                "prompt_idx": p,
                "n_active": n_active,
                "occurrences": triples[lo:hi],
                "scores": scores[lo:hi],
            }
        )
    return rows, sels


def _finished_rows(res_path: Path) -> set[tuple[str, str, int, int]]:
    """Keys (method, budget label, seed, prompt_idx) of the rows a folder already holds."""
    done = set()
    for i, r in enumerate(read_jsonl(res_path), start=1):
        try:
            done.add((r["method"], budget_label(r), int(r["seed"]), int(r["prompt_idx"])))
        except (KeyError, TypeError, ValueError):
            raise DataFormatError(
                f"{res_path}: row {i} is not a pie prune result (needs method, k, budget, seed, prompt_idx); "
                "delete the file to recompute it"
            ) from None
    return done


def _k_value(label: str) -> int | float:
    return float(label[1:]) if label.startswith("f") else int(label)
