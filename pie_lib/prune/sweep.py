"""Resumable sweeps over methods × K ladder × seeds, persisted per batch as rows finish.

Output folder layout::

    DIR/config.json        what produced the rows (identity fields, versions, checkpoint hashes)
    DIR/results.jsonl      one row per (method, k, seed, prompt_idx), appended as batches finish
    DIR/results.parquet    the same rows, rewritten atomically at the end of each run
    DIR/selections.jsonl   kept occurrences [layer, position, feature] and their scores per row

Rerunning the same command skips every finished row: kill it midway, rerun, nothing is lost or
recomputed. Adding methods, budgets or seeds to a finished folder computes only the new rows; a
different model, CLT, data set or scoring configuration is refused (use a new ``--out``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from pie_lib.data.pairs import Pair, load_pairs
from pie_lib.errors import BudgetError, ConfigMismatchError
from pie_lib.prune.context import BatchContext, ScoringConfig
from pie_lib.prune.evaluate import evaluate_keep_masks
from pie_lib.prune.methods import MethodParams, get_methods
from pie_lib.prune.occurrences import tokenize_pairs
from pie_lib.store import append_jsonl, read_jsonl, write_json, write_parquet

log = logging.getLogger(__name__)

DEFAULT_LADDER = (50, 75, 100, 200, 400, 800)
DEFAULT_METHODS = ("fap", "fap-synergy", "clt-relp", "act-mag", "random")
RESULT_COLUMNS = [
    "method", "k", "budget", "seed", "prompt_idx", "n_active", "k_eff", "n_kept", "kl", "pred_change", "faithfulness",
    "completeness", "m_clean", "m_null", "m_circuit", "m_complement", "kl_null", "task", "seconds",
]


@dataclass
class PruneConfig:
    """One ``pie prune`` run. Field names are the CLI flags.

    Attributes:
        model, clt: local folders or hub ids; "toy" / "toy:gpt2" = the embedded toy world.
        data: JSONL of pairs (reference format), or None to generate ``task`` pairs.
        task, n: generated task and number of pairs (per seed).
        data_seed: seed of generated pairs; None = each sweep seed draws its own prompts.
        methods: registry names (``pie_lib.prune.methods.METHODS``).
        k: absolute budgets (occurrences per prompt), clipped to the active set with a warning.
        k_frac: budgets as fractions of each prompt's active set (the toy world is small).
        seeds: seeds of the sweep (partner draws, random baseline, generated prompts).
    """

    model: str = "toy"
    clt: str = "toy"
    data: str | None = None
    task: str = "ioi"
    n: int = 32
    data_seed: int | None = 0
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    k: list[int] = field(default_factory=lambda: list(DEFAULT_LADDER))
    k_frac: list[float] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    out: str = "runs/prune"
    device: str | None = None
    dtype: str | None = None
    remote: bool = False
    batch_size: int = 16
    min_tokens: int = 0
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    params: MethodParams = field(default_factory=MethodParams)
    progress: bool = True

    def ladder(self) -> list[tuple[str, float]]:
        """Budget labels and values: ("50", 50) for absolute, ("f0.05", 0.05) for fractions."""
        if not self.k and not self.k_frac:
            raise BudgetError("empty K ladder; pass --k 50,75,... and/or --k-frac 0.05,...")
        bad = [k for k in self.k if not isinstance(k, int) or k <= 0]
        if bad:
            raise BudgetError(f"budgets {bad} must be positive integers; use --k-frac for fractions")
        badf = [f for f in self.k_frac if not 0 < f <= 1]
        if badf:
            raise BudgetError(f"budget fractions {badf} must be in (0, 1]")
        return [(str(k), float(k)) for k in self.k] + [(f"f{f:g}", float(f)) for f in self.k_frac]

    def identity(self) -> dict[str, Any]:
        """Fields that must match for rows of one folder to be comparable."""
        sc = dataclasses.asdict(self.scoring)
        sc["rows_dtype"] = str(self.scoring.rows_dtype)
        sc.pop("chunk")
        return {
            "model": self.model, "clt": self.clt, "data": self.data,
            "task": None if self.data else self.task, "n": self.n, "data_seed": self.data_seed,
            "min_tokens": self.min_tokens, "scoring": sc,
            "params": {**dataclasses.asdict(self.params)},
        }


def resolve_checkpoints(model: str, clt: str) -> tuple[str, str]:
    """Map "toy" / "toy:<arch>" to the shipped toy-world folders."""
    from pie_lib import toy

    def res(x: str, kind: str) -> str:
        if x == "toy" or x.startswith("toy:"):
            arch = x.split(":", 1)[1] if ":" in x else "llama"
            return str(toy.toy_model_path(arch) if kind == "model" else toy.toy_clt_path(arch))
        return x

    return res(model, "model"), res(clt, "clt")


def _pairs_for_seed(cfg: PruneConfig, model: Any, seed: int) -> list[Pair]:
    if cfg.data:
        return load_pairs(cfg.data, limit=cfg.n if cfg.n else None)
    from pie_lib.data.tasks import generate_task

    data_seed = seed if cfg.data_seed is None else cfg.data_seed
    return generate_task(cfg.task, model.tokenizer, cfg.n, seed=data_seed).pairs


def _check_config(out: Path, cfg: PruneConfig) -> None:
    path = out / "config.json"
    if not path.exists():
        return
    import json

    old = json.loads(path.read_text()).get("identity", {})
    new = json.loads(json.dumps(cfg.identity(), default=str))
    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if diff:
        raise ConfigMismatchError(
            f"{out} holds results of a different configuration (differs in {diff}); "
            "use a new --out folder, or delete the old one to start over"
        )


def run_prune(cfg: PruneConfig, model: Any = None, clt: Any = None) -> pd.DataFrame:
    """Run (or resume) a sweep and return every row of the folder as a DataFrame.

    Args:
        cfg: the run; model / clt: already-loaded objects (else loaded from ``cfg``).
    """
    from pie_lib.clt.io import load_clt
    from pie_lib.models.loading import load_model
    from pie_lib.provenance import checkpoint_fingerprint, file_sha256, versions

    methods = get_methods(cfg.methods)
    ladder = cfg.ladder()
    if not cfg.seeds:
        raise BudgetError("no seeds given; pass --seeds 0,1,2")
    out = Path(cfg.out)
    _check_config(out, cfg)
    model_path, clt_path = resolve_checkpoints(cfg.model, cfg.clt)
    if model is None:
        model = load_model(model_path, device=cfg.device, dtype=cfg.dtype, remote=cfg.remote)
    if clt is None:
        clt = load_clt(clt_path, device=model.device if not cfg.remote else "cpu")
    model.check_clt(clt)
    out.mkdir(parents=True, exist_ok=True)
    write_json({
        "identity": cfg.identity(), "methods": cfg.methods, "k": cfg.k, "k_frac": cfg.k_frac, "seeds": cfg.seeds,
        "versions": versions(), "model_path": model_path, "clt_path": clt_path,
        "model_hash": checkpoint_fingerprint(model_path), "clt_hash": checkpoint_fingerprint(clt_path),
        "data_sha256": file_sha256(cfg.data) if cfg.data else None,
    }, out / "config.json")

    res_path, sel_path = out / "results.jsonl", out / "selections.jsonl"
    done = {(r["method"], _label(r), int(r["seed"]), int(r["prompt_idx"])) for r in read_jsonl(res_path)}
    task_name = "data" if cfg.data else cfg.task
    clipped = 0
    # When every seed sees the same prompts (a data file, or a fixed data_seed), one batch context
    # serves all seeds and seed-independent methods are selected and evaluated once.
    shared = cfg.data is not None or cfg.data_seed is not None
    groups = [(list(cfg.seeds), _pairs_for_seed(cfg, model, cfg.seeds[0]))] if shared else \
        [([s], _pairs_for_seed(cfg, model, s)) for s in cfg.seeds]
    for seeds, pairs in groups:
        tok = tokenize_pairs(model, pairs, batch_size=cfg.batch_size, min_tokens=cfg.min_tokens)
        if tok.skipped:
            log.warning("skipped %d pair(s): %s", len(tok.skipped), dict(list(tok.skipped.items())[:3]))
        bar = tqdm(tok.batches, desc=f"prune seeds {seeds}", disable=not cfg.progress, unit="batch")
        for batch in bar:
            pidx = batch.prompt_idx.tolist()
            todo = {seed: [(m, lab, val) for m in methods for lab, val in ladder
                           if any((m.name, lab, seed, p) not in done for p in pidx)] for seed in seeds}
            if not any(todo.values()):
                continue
            t0 = time.perf_counter()
            ctx = BatchContext(model, clt, batch, cfg.scoring)
            counts = ctx.occ.counts().cpu()
            memo: dict[tuple[str, str], tuple] = {}  # seed-independent (method, K) -> (keep, scores, ev, j)
            for seed in seeds:
                if not todo[seed]:
                    continue
                keeps, scores_of, labels, fresh = [], [], [], []
                for m, lab, val in todo[seed]:
                    key = (m.name, lab)
                    if not m.seeded and key in memo:
                        labels.append((m.name, lab, memo[key][3]))
                        continue
                    if lab.startswith("f"):
                        kv = torch.clamp(torch.ceil(val * counts.double()).long(), min=1)
                    else:
                        kv = torch.full((batch.size,), int(val), dtype=torch.long)
                    clipped += int((kv > counts).sum())
                    keep, sc = m.select(ctx, kv, seed, cfg.params)
                    fresh.append((key, keep, sc, kv, m.seeded))
                    labels.append((m.name, lab, kv))
                if fresh:
                    ev = evaluate_keep_masks(ctx, torch.stack([f[1] for f in fresh]))
                    for j, (key, keep, sc, kv, seeded) in enumerate(fresh):
                        entry = (keep, sc, {n: (v[j] if v.dim() == 2 else v) for n, v in ev.items()}, kv)
                        memo[key] = entry if not seeded else memo.get(key, entry)
                        if seeded:
                            memo[("seeded",) + key] = entry
                secs = (time.perf_counter() - t0) / batch.size
                rows, sels = [], []
                for name, lab, kv in labels:
                    m_seeded = next(m.seeded for m in methods if m.name == name)
                    keep, sc, ev1, kv = memo[("seeded", name, lab)] if m_seeded else memo[(name, lab)]
                    for b, p in enumerate(pidx):
                        if (name, lab, seed, p) in done:
                            continue
                        rows.append({
                            "method": name, "k": _k_value(lab), "budget": "frac" if lab.startswith("f") else "abs",
                            "seed": seed, "prompt_idx": p, "n_active": int(ev1["n_active"][b]),
                            "k_eff": int(min(kv[b], ev1["n_active"][b])), "n_kept": int(ev1["n_kept"][b]),
                            "kl": float(ev1["kl"][b]), "pred_change": bool(ev1["pred_change"][b]),
                            "faithfulness": float(ev1["faithfulness"][b]), "completeness": float(ev1["completeness"][b]),
                            "m_clean": float(ev1["m_clean"][b]), "m_null": float(ev1["m_null"][b]),
                            "m_circuit": float(ev1["m_circuit"][b]), "m_complement": float(ev1["m_complement"][b]),
                            "kl_null": float(ev1["kl_null"][b]), "task": task_name, "seconds": secs,
                        })
                        kept = (keep & (ctx.occ.prompt.cpu() == b)).nonzero().squeeze(-1)
                        sels.append({
                            "method": name, "k": _k_value(lab), "budget": "frac" if lab.startswith("f") else "abs",
                            "seed": seed, "prompt_idx": p, "n_active": int(ev1["n_active"][b]),
                            "occurrences": ctx.occ.triples(kept), "scores": [round(float(x), 7) for x in sc[kept]],
                        })
                append_jsonl(sel_path, sels)  # selections first: a row is finished once its result is written
                append_jsonl(res_path, rows)
                done.update((r["method"], _label(r), r["seed"], r["prompt_idx"]) for r in rows)
    if clipped:
        warnings.warn(f"{clipped} (prompt, K) budgets exceeded the active set and were clipped to it (k_eff < k)")
    df = load_results(out)
    write_parquet(df, out / "results.parquet")
    return df


def load_results(out: str | Path) -> pd.DataFrame:
    """Every finished row of a sweep folder (duplicates from a crash between files dropped)."""
    rows = read_jsonl(Path(out) / "results.jsonl")
    df = pd.DataFrame(rows, columns=RESULT_COLUMNS) if rows else pd.DataFrame(columns=RESULT_COLUMNS)
    df = df.drop_duplicates(subset=["method", "budget", "k", "seed", "prompt_idx"], keep="last")
    return df.reset_index(drop=True)


def load_selections(out: str | Path) -> list[dict[str, Any]]:
    """Selections of a sweep folder, last write wins per (method, k, seed, prompt_idx)."""
    rows = read_jsonl(Path(out) / "selections.jsonl")
    latest = {(r["method"], _label(r), r["seed"], r["prompt_idx"]): r for r in rows}
    return list(latest.values())


def _k_value(label: str) -> int | float:
    return float(label[1:]) if label.startswith("f") else int(label)


def _label(row: dict[str, Any]) -> str:
    """The ladder label of a stored row: "50" for K=50, "f0.05" for 5% of the active set."""
    return f"f{float(row['k']):g}" if row.get("budget") == "frac" else str(int(row["k"]))
