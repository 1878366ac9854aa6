"""What a ``pie prune`` folder holds, read back: result rows, selections, and the step every run
(and ``pie merge``) ends with. A leaf of the sweep: :mod:`pie_lib.prune.sweep` and
:mod:`pie_lib.prune.shard` both use it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from pie_lib.selections import latest_selections, write_selections_table
from pie_lib.store import read_jsonl, write_parquet_columns

if TYPE_CHECKING:  # pandas (~0.3 s to import) only for callers that ask for a DataFrame
    import pandas as pd

RESULT_COLUMNS = [
    "method",
    "k",
    "budget",
    "seed",
    "prompt_idx",
    "prompt_id",
    "n_active",
    "k_eff",
    "n_kept",
    "kl",
    "pred_change",
    "faithfulness",
    "completeness",
    "m_clean",
    "m_null",
    "m_circuit",
    "m_complement",
    "kl_null",
    "task",
    "seconds",
]


#: The key a result row is finished under; a later row of the same key replaces an earlier one.
RESULT_KEY = ("method", "budget", "k", "seed", "prompt_idx")


def result_rows(out: str | Path) -> list[dict[str, Any]]:
    """Every finished row of a sweep folder, as :data:`RESULT_COLUMNS` dicts in file order (a missing
    field is None), duplicates from a crash between files dropped: the last row of a key is kept, at
    its own place (what ``DataFrame.drop_duplicates(keep="last")`` keeps)."""
    rows = [{c: r.get(c) for c in RESULT_COLUMNS} for r in read_jsonl(Path(out) / "results.jsonl")]
    last = {tuple(r[c] for c in RESULT_KEY): i for i, r in enumerate(rows)}
    if len(last) == len(rows):
        return rows
    keep = set(last.values())
    return [r for i, r in enumerate(rows) if i in keep]


def results_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """:func:`result_rows` as a DataFrame (columns :data:`RESULT_COLUMNS`)."""
    import pandas as pd

    return pd.DataFrame(rows, columns=RESULT_COLUMNS) if rows else pd.DataFrame(columns=RESULT_COLUMNS)


def load_results(out: str | Path) -> pd.DataFrame:
    """Every finished row of a sweep folder (duplicates from a crash between files dropped)."""
    return results_frame(result_rows(out))


def load_selections(out: str | Path) -> list[dict[str, Any]]:
    """Selections of a sweep folder, last write wins per (method, k, seed, prompt_idx)."""
    return latest_selections(read_jsonl(Path(out) / "selections.jsonl"))


def finish_rows(out: str | Path) -> list[dict[str, Any]]:
    """What every run (and ``pie merge``) ends with: ``results.parquet`` and ``selections.parquet``
    from the folder's rows (written without pandas); returns :func:`result_rows`."""
    rows = result_rows(out)
    write_parquet_columns({c: [r[c] for r in rows] for c in RESULT_COLUMNS}, Path(out) / "results.parquet")
    write_selections_table(load_selections(out), Path(out) / "selections.parquet")
    return rows


def finish_folder(out: str | Path) -> pd.DataFrame:
    """:func:`finish_rows`, its rows as a DataFrame."""
    return results_frame(finish_rows(out))
