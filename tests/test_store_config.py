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
