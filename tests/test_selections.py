"""selections.parquet (one row per kept occurrence) equals selections.jsonl; query_selections filters."""

from __future__ import annotations

import pandas as pd
import pytest

from pie_lib.errors import DataFormatError
from pie_lib.prune.sweep import PruneConfig, load_selections, run_prune
from pie_lib.selections import SELECTION_COLUMNS, query_selections, selections_table


def test_parquet_table_equals_jsonl_records(tmp_path, one_torch_thread):
    cfg = PruneConfig(model="toy", clt="toy", n=3, methods=["fap", "random"], k=[3, 6], k_frac=[0.5], seeds=[0, 1],
                      out=str(tmp_path / "run"), device="cpu", progress=False)  # fmt: skip
    run_prune(cfg)
    table = pd.read_parquet(tmp_path / "run" / "selections.parquet")
    assert list(table.columns) == SELECTION_COLUMNS
    recs = load_selections(tmp_path / "run")
    assert len(table) == sum(len(r["occurrences"]) for r in recs) > 0
    for r in recs:
        rows = table[(table.method == r["method"]) & (table.k == float(r["k"])) & (table.budget == r["budget"])
                     & (table.seed == r["seed"]) & (table.prompt_idx == r["prompt_idx"])]  # fmt: skip
        assert rows[["layer", "position", "feature"]].values.tolist() == r["occurrences"]
        assert rows["score"].tolist() == pytest.approx(r["scores"])
        by_rank = rows.sort_values("rank")
        assert sorted(by_rank["rank"]) == list(range(1, len(rows) + 1))
        assert list(by_rank["score"].abs()) == sorted(rows["score"].abs(), reverse=True)
    assert set(table.budget) == {"abs", "frac"}


def test_query_and_rank_ties():
    recs = [
        {"method": "fap", "k": 2, "budget": "abs", "seed": 0, "prompt_idx": 0, "occurrences": [[0, 1, 2], [1, 1, 3]],
         "scores": [0.5, -0.5]},
        {"method": "fap", "k": 0.5, "budget": "frac", "seed": 1, "prompt_idx": 1, "occurrences": [[0, 1, 2]],
         "scores": [1.0]},
        {"method": "random", "k": 2, "seed": 0, "prompt_idx": 1, "occurrences": [], "scores": []},
    ]  # fmt: skip
    assert query_selections(recs, methods="fap", budget="abs") == recs[:1]
    assert query_selections(recs, ks=[0.5]) == recs[1:2]
    assert query_selections(recs, seeds=0, prompts=range(1, 5)) == recs[2:]
    assert query_selections(recs, budget="abs") == [recs[0], recs[2]]  # no "budget" field = absolute K
    t = selections_table(recs)
    assert t["rank"].tolist() == [1, 2, 1]  # |score| ties keep the stored order
    with pytest.raises(DataFormatError, match="2 occurrences but 1 scores"):
        selections_table([{**recs[0], "scores": [0.1]}])
