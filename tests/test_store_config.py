"""store.check_same_config / read_config: the one configuration-mismatch check of every results folder."""

from __future__ import annotations

import pytest

from pie_lib.errors import ConfigMismatchError, OutputPathError
from pie_lib.store import check_same_config, read_config, write_json


def test_mismatch_names_the_keys_and_keeps_braces_in_the_message():
    stored = {"a": [1, 2], "b": "x", "c": 1}
    check_same_config(stored, {"a": (1, 2), "b": "x", "c": 1}, "unused {keys}")  # tuple == list after JSON
    check_same_config(None, {"anything": 1}, "unused {keys}")  # a new folder
    check_same_config(stored, {"a": [1, 2], "b": "y", "c": 1}, "{keys}", keys=["a", "c"])  # b not compared
    with pytest.raises(ConfigMismatchError, match=r"^folder \{'m': 1\} differs in \['b', 'd'\]$"):
        check_same_config(stored, {"a": [1, 2], "b": "y", "c": 1, "d": 0}, "folder {'m': 1} differs in {keys}")


def test_read_config_missing_corrupt_and_not_an_object(tmp_path):
    assert read_config(tmp_path / "none.json") is None
    write_json({"k": 1}, tmp_path / "ok.json")
    assert read_config(tmp_path / "ok.json") == {"k": 1}
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(OutputPathError, match="corrupt config file.*pie prune results folder"):
        read_config(tmp_path / "bad.json", "pie prune")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(OutputPathError, match="not a pie config"):
        read_config(tmp_path / "list.json")


def test_write_parquet_columns_matches_pandas(tmp_path):
    """The pyarrow-only writer stores what ``DataFrame.to_parquet`` stores: inferred types, NaN and
    None as nulls, strings; a column mixing types is refused."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq
    import pytest

    from pie_lib.store import write_parquet_columns

    cols = {
        "i": [1, 2, 3],
        "mix": [1, 2.5, 3],
        "f": [1.0, float("nan"), None],
        "b": [True, False, True],
        "s": ["a", "é", "ccc"],
        "none": [None, None, None],
    }
    write_parquet_columns(cols, tmp_path / "a.parquet")
    pd.DataFrame(cols).to_parquet(tmp_path / "b.parquet", index=False)
    a, b = pq.read_table(tmp_path / "a.parquet"), pq.read_table(tmp_path / "b.parquet")
    assert a.schema.remove_metadata() == b.schema.remove_metadata()
    assert a.to_pydict() == b.to_pydict() == {**cols, "mix": [1.0, 2.5, 3.0], "f": [1.0, None, None]}
    write_parquet_columns({"s": ["x", None], "i": [1, None]}, tmp_path / "c.parquet", {"s": "string"})
    c = pq.read_table(tmp_path / "c.parquet")
    assert c.schema.field("s").type == pa.string() and c.to_pydict() == {"s": ["x", None], "i": [1, None]}
    write_parquet_columns({"e": []}, tmp_path / "d.parquet", {"e": "int64"})
    assert pq.read_table(tmp_path / "d.parquet").num_rows == 0
    with pytest.raises(TypeError, match="mixes"):
        write_parquet_columns({"x": [1, "a"]}, tmp_path / "e.parquet")
