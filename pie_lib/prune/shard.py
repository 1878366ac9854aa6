"""Split one sweep across processes, GPUs or machines, and merge the parts into one folder.

``pie prune ... --shard I/N`` (I = 0 .. N-1) computes a deterministic 1/N of the sweep's
(prompt, method, K, seed) rows. The unit of work is a *prompt batch* (the batches of an
unsharded run, in its order): its caches and gradients are computed once and serve every method,
budget and seed, and a row computed in a shard is computed exactly as in the unsharded run.
Batches are dealt out greedily by row count (each to the shard with the fewest rows so far; ties
to the lowest index), so every launcher that runs indices 0 .. N-1 once -- a Slurm array, torchrun
ranks, Ray tasks -- covers the sweep exactly once.

A shard writes only inside its own folder, ``DIR/shards/shard-I-of-N/`` (config.json, plan.json,
results.jsonl, selections.jsonl, results.parquet): shards never share a file. ``pie merge --out
DIR`` (and any later unsharded run on DIR) combines them into ``DIR/results.jsonl``,
``DIR/selections.jsonl`` and the files an unsharded run finishes with (``results.parquet``, ...),
rows in the order an unsharded run writes them.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pie_lib.errors import ConfigMismatchError, DataFormatError, OutputPathError, SettingError

SHARDS_DIR = "shards"


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (0-based)."""

    index: int
    count: int

    @property
    def name(self) -> str:
        return f"shard-{self.index}-of-{self.count}"

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse_shard(text: str | None) -> Shard | None:
    """``"I/N"`` -> :class:`Shard`; None stays None. A clear error for anything else."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not m:
        raise SettingError(f"--shard {text!r}: expected I/N with 0 <= I < N (e.g. --shard 0/4)")
    index, count = int(m.group(1)), int(m.group(2))
    if count < 1 or not 0 <= index < count:
        raise SettingError(f"--shard {text!r}: need N >= 1 and 0 <= I < N (shards are numbered 0 .. N-1)")
    return Shard(index, count)


def shard_folder(out: str | Path, shard: Shard) -> Path:
    return Path(out) / SHARDS_DIR / shard.name


@dataclass(frozen=True)
class Unit:
    """One prompt batch of the sweep: its seed group, position, seeds and prompt indices."""

    group: int
    batch: int
    seeds: tuple[int, ...]
    prompts: tuple[int, ...]

    @property
    def rows(self) -> int:
        return len(self.seeds) * len(self.prompts)


def plan_units(tokenized: list[tuple[list[int], Any]]) -> list[Unit]:
    """The batches of a sweep in the order an unsharded run visits them.

    Args:
        tokenized: ``(seeds, TokenizedPairs)`` per seed group, as the sweep builds them.
    """
    return [
        Unit(g, b, tuple(int(s) for s in seeds), tuple(int(p) for p in batch.prompt_idx.tolist()))
        for g, (seeds, tok) in enumerate(tokenized)
        for b, batch in enumerate(tok.batches)
    ]


def assign(units: list[Unit], count: int) -> list[int]:
    """Owner shard of every unit: greedy by row count, ties to the lowest shard index."""
    load = [0] * count
    owners = []
    for u in units:
        i = min(range(count), key=lambda s: (load[s], s))
        owners.append(i)
        load[i] += u.rows
    return owners


def plan_record(units: list[Unit], count: int, methods: list[str], labels: list[str]) -> dict[str, Any]:
    """What ``plan.json`` holds: identical in every shard of one sweep (merge checks that)."""
    return {
        "count": count,
        "methods": list(methods),
        "labels": list(labels),
        "units": [asdict(u) for u in units],
        "owners": assign(units, count),
    }


def _shard_folders(out: Path) -> list[tuple[Shard, Path]]:
    root = out / SHARDS_DIR
    if not root.is_dir():
        return []
    found = []
    for p in sorted(root.iterdir()):
        m = re.fullmatch(r"shard-(\d+)-of-(\d+)", p.name)
        if m and p.is_dir():
            found.append((Shard(int(m.group(1)), int(m.group(2))), p))
    return found


def has_shards(out: str | Path) -> bool:
    return bool(_shard_folders(Path(out)))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise OutputPathError(f"{path} is missing: that shard never started; run it (pie prune ... --shard)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataFormatError(f"{path}: corrupt ({exc}); rerun that shard") from None
    if not isinstance(obj, dict):
        raise DataFormatError(f"{path}: not a JSON object; rerun that shard")
    return obj


@dataclass
class MergeReport:
    """What :func:`merge_shards` combined."""

    shards: int
    rows: int
    missing_rows: int


def merge_shards(out: str | Path, require_complete: bool = True) -> MergeReport:
    """Combine ``DIR/shards/*`` into ``DIR``'s results and selections, as one unsharded run.

    Rows already in ``DIR`` (an unsharded run, an earlier merge) are kept; a row present in both
    is the same computation, and the shard's copy is used. The combined rows are written in the
    order an unsharded run writes them, then ``DIR`` is finished like an unsharded run.

    Args:
        require_complete: refuse (a one-line error naming the shards) when a shard is missing or
            has not finished all its rows; ``pie merge`` requires it, a later unsharded run does
            not (it computes what is missing).
    """
    from pie_lib.prune.results import finish_folder
    from pie_lib.selections import budget_label
    from pie_lib.store import read_jsonl, write_json, write_jsonl

    out = Path(out)
    found = _shard_folders(out)
    if not found:
        raise OutputPathError(
            f"{out} holds no shards ({out / SHARDS_DIR}/shard-I-of-N); run pie prune ... --shard I/N first"
        )
    counts = sorted({s.count for s, _ in found})
    if len(counts) > 1:
        raise ConfigMismatchError(
            f"{out / SHARDS_DIR} mixes sweeps split {counts} ways; keep one split (delete the others)"
        )
    count = counts[0]
    present = {s.index for s, _ in found}
    missing = [f"{i}/{count}" for i in range(count) if i not in present]
    if missing and require_complete:
        raise OutputPathError(
            f"{out}: shard(s) {', '.join(missing)} missing; run them (pie prune ... --shard I/{count})"
        )
    configs = {s.index: _read_json(p / "config.json") for s, p in found}
    plans = {s.index: _read_json(p / "plan.json") for s, p in found}
    first = min(configs)
    identity = configs[first].get("identity")
    for i, cfg in configs.items():
        if cfg.get("identity") != identity or any(
            cfg.get(k) != configs[first].get(k) for k in ("methods", "k", "k_frac", "seeds", "model_hash", "clt_hash")
        ):
            raise ConfigMismatchError(
                f"shard {i}/{count} of {out} ran another configuration than shard {first}/{count}; "
                "rerun it with the same command"
            )
        if plans[i] != plans[first]:
            raise ConfigMismatchError(
                f"shard {i}/{count} of {out} planned other batches than shard {first}/{count} "
                "(different pairs or batch size); rerun it with the same command"
            )
    top = out / "config.json"
    if top.exists():
        stored = _read_json(top)
        if stored.get("identity") != identity:
            raise ConfigMismatchError(
                f"{out} holds results of a different configuration than its shards; use a new --out folder"
            )
    plan = plans[first]
    units = [Unit(u["group"], u["batch"], tuple(u["seeds"]), tuple(u["prompts"])) for u in plan["units"]]
    where: dict[tuple[int, int], tuple[int, int, int]] = {}
    for ui, u in enumerate(units):
        for si, s in enumerate(u.seeds):
            for pi, p in enumerate(u.prompts):
                where[(s, p)] = (ui, si, pi)
    m_pos = {m: i for i, m in enumerate(plan["methods"])}
    l_pos = {lab: i for i, lab in enumerate(plan["labels"])}

    def key(r: dict[str, Any]) -> tuple:
        return (r["method"], budget_label(r), int(r["seed"]), int(r["prompt_idx"]))

    def order(item: tuple[int, dict[str, Any]]) -> tuple:
        n, r = item
        w = where.get((int(r["seed"]), int(r["prompt_idx"])))
        if w is None or r["method"] not in m_pos or budget_label(r) not in l_pos:
            return (1, n)  # not part of this plan: after the planned rows, in file order
        ui, si, pi = w
        return (0, ui, si, m_pos[r["method"]], l_pos[budget_label(r)], pi)

    results: dict[tuple, dict[str, Any]] = {}
    selections: dict[tuple, dict[str, Any]] = {}
    for r in read_jsonl(out / "results.jsonl"):
        results[key(r)] = r
    for r in read_jsonl(out / "selections.jsonl"):
        selections[key(r)] = r
    incomplete = []
    for s, p in sorted(found, key=lambda x: x[0].index):
        rows = read_jsonl(p / "results.jsonl")
        for r in rows:
            results[key(r)] = r
        for r in read_jsonl(p / "selections.jsonl"):
            selections[key(r)] = r
        own = (
            sum(u.rows for u, o in zip(units, plan["owners"]) if o == s.index)
            * len(plan["methods"])
            * len(plan["labels"])
        )
        have = len({key(r) for r in rows})
        if have < own:
            incomplete.append(f"{s} ({have} of {own} rows)")
    if incomplete and require_complete:
        raise OutputPathError(f"{out}: shard(s) {', '.join(incomplete)} not finished; rerun them with the same command")
    lost = [k for k in results if k not in selections]
    if lost:
        raise DataFormatError(
            f"{out}: {len(lost)} result row(s) without a selection (e.g. {lost[0]}); rerun that shard"
        )

    res_rows = [r for _, r in sorted(enumerate(results.values()), key=order)]
    sel_rows = [selections[key(r)] for r in res_rows]
    out.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in configs[first].items() if k != "shard"}
    write_json(config, top)

    write_jsonl(out / "selections.jsonl", sel_rows)
    write_jsonl(out / "results.jsonl", res_rows)
    finish_folder(out)
    planned = sum(u.rows for u in units) * len(plan["methods"]) * len(plan["labels"])
    done = sum(1 for r in res_rows if order((0, r))[0] == 0)
    return MergeReport(shards=len(found), rows=len(res_rows), missing_rows=max(0, planned - done))
