"""Selections -- the kept occurrences of every (method, K, seed, prompt) -- as records and as a table.

``pie prune`` writes both, into its folder:

- ``selections.jsonl``: one record per (method, k, budget, seed, prompt_idx), appended as batches
  finish: ``{"method", "k", "budget", "seed", "prompt_idx", "n_active", "occurrences": [[layer,
  position, feature], ...], "scores": [...]}`` (the input of ``pie interpret`` and ``pie graph``);
- ``selections.parquet``: one row per kept occurrence, columns :data:`SELECTION_COLUMNS`; ``rank``
  is 1 for the occurrence with the largest |score| of its selection (ties: the stored order).

:func:`query_selections` is the one filter over records (by method, K, seed, prompt, budget).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np

from pie_lib.errors import DataFormatError
from pie_lib.store import write_parquet_columns

if TYPE_CHECKING:  # pandas (~0.3 s to import) only for callers that ask for a DataFrame
    import pandas as pd

SELECTION_COLUMNS = ["method", "k", "budget", "seed", "prompt_idx", "layer", "position", "feature", "score", "rank"]

Record = dict[str, Any]


def budget_label(record: Record) -> str:
    """The ladder label of a stored row: "50" for K=50, "f0.05" for 5% of the active set."""
    return f"f{float(record['k']):g}" if record.get("budget") == "frac" else str(int(record["k"]))


def latest_selections(records: Iterable[Record]) -> list[Record]:
    """One record per (method, budget label, seed, prompt_idx): the last one written wins."""
    latest = {(r["method"], budget_label(r), r["seed"], r["prompt_idx"]): r for r in records}
    return list(latest.values())


def query_selections(
    records: Iterable[Record],
    methods: str | Sequence[str] | None = None,
    ks: float | Sequence[float] | None = None,
    seeds: int | Sequence[int] | None = None,
    prompts: Iterable[int] | None = None,
    budget: str | None = None,
) -> list[Record]:
    """The records of the given methods, budgets K, seeds, prompts and budget kind ("abs" / "frac").

    Each filter is a value or a collection of values; None keeps every value. A record without a
    ``budget`` field is an absolute-K record.
    """

    def values(x: Any) -> Sequence[Any] | None:
        return None if x is None else ([x] if isinstance(x, (str, int, float)) else list(x))

    want_m, want_k, want_s, want_p = values(methods), values(ks), values(seeds), values(prompts)
    k_set = None if want_k is None else {float(k) for k in want_k}
    s_set = None if want_s is None else {int(s) for s in want_s}
    p_set = None if want_p is None else {int(p) for p in want_p}
    return [
        r
        for r in records
        if (want_m is None or r["method"] in want_m)
        and (k_set is None or float(r["k"]) in k_set)
        and (s_set is None or int(r["seed"]) in s_set)
        and (p_set is None or int(r["prompt_idx"]) in p_set)
        and (budget is None or r.get("budget", "abs") == budget)
    ]


def read_selections(path: str | os.PathLike) -> list[Record]:
    """Read and check a ``selections.jsonl`` (every record needs ``occurrences`` as triples).

    Strict: a line that is not a JSON object (bad JSON, not UTF-8) is an error naming it; a torn
    last line (a killed ``pie prune``) is dropped, as ``pie prune`` itself does.
    """
    from pie_lib.store import read_jsonl

    path = Path(path)
    if not path.exists():
        raise DataFormatError(
            f"selections file {path} does not exist; run `pie prune` first or pass the right --selections"
        )
    if path.is_dir():
        raise DataFormatError(f"--selections {path} is a folder; pass the selections.jsonl that `pie prune` wrote")
    out = []
    for lineno, obj in enumerate(read_jsonl(path), 1):
        occ = obj.get("occurrences")
        if not isinstance(occ, list) or any(
            not isinstance(o, (list, tuple)) or len(o) != 3 or not all(_is_index(x) for x in o) for o in occ
        ):
            raise DataFormatError(
                f'{path}: row {lineno}: expected an object with "occurrences": [[layer, position, feature], ...] '
                "of non-negative integers"
            )
        out.append(obj)
    if not out:
        raise DataFormatError(f"selections file {path} holds no selections; run `pie prune` (it writes them)")
    return out


def _is_index(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


#: Arrow types of the selections table's columns other than int64 (the strings as pandas writes an
#: ``object`` column).
SELECTION_TYPES = {"method": "string", "k": "float64", "budget": "string", "score": "float64"}


def selection_columns(records: Iterable[Record]) -> dict[str, list[Any]]:
    """:data:`SELECTION_COLUMNS` as plain lists: one row per kept occurrence, records in order,
    occurrences in stored order (types :data:`SELECTION_TYPES`, the others int64)."""
    cols: dict[str, list[Any]] = {c: [] for c in SELECTION_COLUMNS}
    for r in records:
        occ = r["occurrences"]
        scores = np.asarray(r.get("scores", [np.nan] * len(occ)), dtype=np.float64)
        if len(scores) != len(occ):
            raise DataFormatError(
                f"selection {r['method']} k={r['k']} seed={r['seed']} prompt {r['prompt_idx']}: "
                f"{len(occ)} occurrences but {len(scores)} scores"
            )
        order = np.argsort(-np.abs(scores), kind="stable")  # NaN scores sort last
        rank = np.empty(len(occ), dtype=np.int64)
        rank[order] = np.arange(1, len(occ) + 1)
        n = len(occ)
        cols["method"] += [r["method"]] * n
        cols["k"] += [float(r["k"])] * n
        cols["budget"] += [r.get("budget", "abs")] * n
        cols["seed"] += [int(r["seed"])] * n
        cols["prompt_idx"] += [int(r["prompt_idx"])] * n
        for j, name in enumerate(("layer", "position", "feature")):
            cols[name] += [int(o[j]) for o in occ]
        cols["score"] += scores.tolist()
        cols["rank"] += rank.tolist()
    return cols


def selections_table(records: Iterable[Record]) -> pd.DataFrame:
    """One row per kept occurrence (:data:`SELECTION_COLUMNS`), records in order, occurrences in stored order."""
    import pandas as pd

    cols = selection_columns(records)
    dtypes = {"method": "object", "k": "float64", "budget": "object", "score": "float64"}
    return pd.DataFrame({c: pd.Series(v, dtype=dtypes.get(c, "int64")) for c, v in cols.items()})


def write_selections_table(records: Iterable[Record], path: str | os.PathLike) -> Path:
    """:func:`selections_table` of ``records`` as parquet, atomically (written without pandas: the
    arrow schema is the one pandas wrote, without pandas' metadata, so ``pd.read_parquet`` gives its
    string columns pandas' ``str`` dtype instead of ``object``)."""
    types = {c: SELECTION_TYPES.get(c, "int64") for c in SELECTION_COLUMNS}
    return write_parquet_columns(selection_columns(records), path, types)
