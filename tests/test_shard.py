"""``pie prune --shard I/N`` + ``pie merge``: a sweep in shards, merged, is the unsharded sweep row for row."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from pie_lib.cli import main
from pie_lib.errors import ConfigMismatchError, OutputPathError, SettingError
from pie_lib.prune.shard import Shard, Unit, assign, merge_shards, parse_shard
from pie_lib.prune.sweep import PruneConfig, run_prune


def _cfg(world, out, **kw):
    base = dict(
        model=str(world.model_dir),
        clt=str(world.clt_dir),
        data=str(world.pairs_path),
        n=8,
        methods=["fap", "fap-synergy", "random"],
        k=[2, 4],
        seeds=[0, 1],
        batch_size=2,
        progress=False,
        out=str(out),
    )
    return PruneConfig(**{**base, **kw})


def _lines(path):
    return path.read_text(encoding="utf-8").splitlines()


def _same_rows(a, b):
    """Row for row, every column; ``seconds`` is wall time, so only its presence is compared."""
    ra, rb = pd.read_parquet(a / "results.parquet"), pd.read_parquet(b / "results.parquet")
    assert list(ra.columns) == list(rb.columns) and len(ra) == len(rb) > 0
    pd.testing.assert_frame_equal(ra.drop(columns="seconds"), rb.drop(columns="seconds"), check_exact=True)
    assert _lines(a / "selections.jsonl") == _lines(b / "selections.jsonl")
    # the table the sweep's finish step writes, from the merged selections
    pd.testing.assert_frame_equal(
        pd.read_parquet(a / "selections.parquet"), pd.read_parquet(b / "selections.parquet"), check_exact=True
    )


@pytest.fixture(scope="module")
def unsharded(tiny_worlds, tmp_path_factory, one_torch_thread):
    w = tiny_worlds["gpt2"]
    out = tmp_path_factory.mktemp("unsharded")
    run_prune(_cfg(w, out), model=w.model, clt=w.clt)
    return out


def test_three_shards_merged_equal_the_unsharded_sweep(tiny_worlds, unsharded, tmp_path, one_torch_thread):
    w = tiny_worlds["gpt2"]
    out = tmp_path / "sharded"
    sizes = []
    for i in (2, 0, 1):  # any order, any machine
        df = run_prune(_cfg(w, out, shard=f"{i}/3"), model=w.model, clt=w.clt)
        sizes.append(len(df))
        assert not (out / "results.parquet").exists()  # a shard writes only inside its own folder
        assert (out / "shards" / f"shard-{i}-of-3" / "results.parquet").exists()
    total = len(pd.read_parquet(unsharded / "results.parquet"))
    assert sum(sizes) == total and all(s > 0 for s in sizes)  # disjoint parts covering the sweep
    assert main(["merge", "--out", str(out)]) == 0
    _same_rows(out, unsharded)
    cfg_m, cfg_u = json.loads((out / "config.json").read_text()), json.loads((unsharded / "config.json").read_text())
    assert cfg_m["identity"] == cfg_u["identity"] and "shard" not in cfg_m
    # merging again, or resuming the folder unsharded, changes nothing and recomputes nothing
    merge_shards(out)
    _same_rows(out, unsharded)
    before = _lines(out / "results.jsonl")
    run_prune(_cfg(w, out), model=w.model, clt=w.clt)
    assert _lines(out / "results.jsonl") == before


def test_a_later_unsharded_run_completes_missing_shards(tiny_worlds, unsharded, tmp_path, one_torch_thread):
    w = tiny_worlds["gpt2"]
    out = tmp_path / "partial"
    run_prune(_cfg(w, out, shard="1/3"), model=w.model, clt=w.clt)
    with pytest.raises(OutputPathError, match=r"shard\(s\) 0/3, 2/3 missing"):
        merge_shards(out)
    run_prune(_cfg(w, out), model=w.model, clt=w.clt)  # takes shard 1's rows, computes the rest
    ra, rb = pd.read_parquet(out / "results.parquet"), pd.read_parquet(unsharded / "results.parquet")
    key = ["method", "k", "seed", "prompt_idx"]
    pd.testing.assert_frame_equal(
        ra.drop(columns="seconds").sort_values(key).reset_index(drop=True),
        rb.drop(columns="seconds").sort_values(key).reset_index(drop=True),
    )


def test_shards_of_another_configuration_are_refused(tiny_worlds, tmp_path, one_torch_thread):
    w = tiny_worlds["gpt2"]
    out = tmp_path / "mixed"
    run_prune(_cfg(w, out, shard="0/2", k=[2]), model=w.model, clt=w.clt)
    run_prune(_cfg(w, out, shard="1/2", k=[2], methods=["fap"]), model=w.model, clt=w.clt)
    with pytest.raises(ConfigMismatchError, match="shard 1/2"):
        merge_shards(out)


def test_shard_spec_and_assignment():
    assert parse_shard("2/8") == Shard(2, 8) and parse_shard(None) is None
    for bad in ("8/8", "-1/2", "1/0", "x", "1-2"):
        with pytest.raises(SettingError, match="--shard"):
            parse_shard(bad)
    units = [Unit(0, b, (0, 1), tuple(range(n))) for b, n in enumerate([4, 1, 1, 2, 3, 1])]
    owners = assign(units, 3)
    assert owners == assign(units, 3)  # deterministic
    load = [sum(u.rows for u, o in zip(units, owners) if o == s) for s in range(3)]
    assert max(load) - min(load) <= 2 * max(u.rows for u in units) and sorted(set(owners)) == [0, 1, 2]
