"""What a ``pie prune`` folder holds, read back: result rows, selections, and the step every run
(and ``pie merge``) ends with. A leaf of the sweep: :mod:`pie_lib.prune.sweep` and
:mod:`pie_lib.prune.shard` both use it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from pie_lib.selections import latest_selections, write_selections_table
from pie_lib.store import read_jsonl, write_parquet

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


def load_results(out: str | Path) -> pd.DataFrame:
    """Every finished row of a sweep folder (duplicates from a crash between files dropped)."""
    rows = read_jsonl(Path(out) / "results.jsonl")
    df = pd.DataFrame(rows, columns=RESULT_COLUMNS) if rows else pd.DataFrame(columns=RESULT_COLUMNS)
    df = df.drop_duplicates(subset=["method", "budget", "k", "seed", "prompt_idx"], keep="last")
    return df.reset_index(drop=True)


def load_selections(out: str | Path) -> list[dict[str, Any]]:
    """Selections of a sweep folder, last write wins per (method, k, seed, prompt_idx)."""
    return latest_selections(read_jsonl(Path(out) / "selections.jsonl"))


def finish_folder(out: str | Path) -> pd.DataFrame:
    """What every run (and ``pie merge``) ends with: ``results.parquet`` and ``selections.parquet``
    from the folder's rows."""
    df = load_results(out)
    write_parquet(df, Path(out) / "results.parquet")
    write_selections_table(load_selections(out), Path(out) / "selections.parquet")
    return df
