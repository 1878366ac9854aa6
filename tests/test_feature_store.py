"""The feature-store reader on stores written byte by byte in the reference's format, the writer
round trip, the one-line errors, and hub access by range reads with a disk cache (a local stand-in
for the hub filesystem, since tests run offline)."""

from __future__ import annotations

import gzip
import json
import struct
import zlib
from pathlib import Path

import pytest

from pie_lib.clt.naming import cantor, cantor_unpair
from pie_lib.interpret.feature_store import FeatureStore, FeatureStoreError, record_examples, write_feature_store


def _record(layer: int, feature: int) -> dict:
    toks = ["The", " cat", f" f{feature}", " sat"]
    return {
        "examples_quantiles": [
            {
                "quantile_name": "Top activations",
                "examples": [
                    {
                        "tokens": toks,
                        "tokens_acts_list": [0.0, 0.5, 2.0 + layer, 0.0],
                        "train_token_ind": 2,
                        "is_repeated_datapoint": False,
                    }
                ],
            },
            {
                "quantile_name": "Subsample Interval 1",
                "examples": [
                    {
                        "tokens": toks[:2],
                        "tokens_acts_list": [0.1, 0.2],
                        "train_token_ind": 1,
                        "is_repeated_datapoint": False,
                    }
                ],
            },
        ],
        "act_min": 0.0,
        "act_max": 2.0 + layer,
    }


def _deflate(raw: bytes) -> bytes:
    c = zlib.compressobj(wbits=-15)
    return c.compress(raw) + c.flush()


def _hand_written_store(root: Path, codec, offsets_end: bool = True, index_as_list: bool = False) -> Path:
    """Bytes laid out exactly as the public stores are: per layer one .bin of (u32 LE length, body)
    records, and index.json.gz with each layer's file name and per-feature byte offsets."""
    feats = root / "features"
    feats.mkdir(parents=True)
    F = 6
    index = {}
    for layer in range(2):
        blob, offsets = b"", []
        for f in range(F):
            offsets.append(len(blob))
            if f == 4:  # feature 4 has no record
                continue
            body = codec(json.dumps(_record(layer, f)).encode())
            blob += struct.pack("<I", len(body)) + body
        if offsets_end:
            offsets.append(len(blob))
        (feats / f"layer{layer}.bin").write_bytes(blob)
        index[str(layer)] = {"filename": f"layer{layer}.bin", "offsets": offsets}
    if not offsets_end:  # without end offsets a missing record cannot be told apart: drop feature 4 entirely
        for layer in index:
            index[layer]["offsets"] = index[layer]["offsets"][:4]
    data = [index["0"], index["1"]] if index_as_list else index
    (feats / "index.json.gz").write_bytes(gzip.compress(json.dumps(data).encode()))
    return root


@pytest.mark.parametrize("codec", [gzip.compress, zlib.compress, _deflate], ids=["gzip", "zlib", "deflate"])
@pytest.mark.parametrize("offsets_end,index_as_list", [(True, False), (False, True)])
def test_reads_reference_format(tmp_path, codec, offsets_end, index_as_list):
    root = _hand_written_store(tmp_path, codec, offsets_end, index_as_list)
    for path in (root, root / "features"):
        st = FeatureStore.open(path)
        for layer in range(2):
            for f in (0, 1, 3):
                assert st.record(layer, f) == _record(layer, f)
    fx = record_examples(st.record(1, 3), 1, 3)
    assert [e.kind for e in fx.examples] == ["top", "quantile"]
    assert fx.examples[0].text == "The cat f3 sat" and fx.examples[0].act == 3.0
    assert fx.examples[0].starts == [0, 3, 7, 10] and fx.max_act == 3.0


@pytest.mark.parametrize("compression", ["gzip", "zlib", "deflate"])
def test_writer_round_trip(tmp_path, compression):
    recs = {(l, f): _record(l, f) for l in range(3) for f in (0, 2, 7)}
    write_feature_store(tmp_path, recs, n_features=8, compression=compression)
    st = FeatureStore.open(tmp_path)
    assert st.records(recs) == recs
    assert not st.has(0, 1) and st.has(2, 7)
    raw = json.loads(gzip.decompress((tmp_path / "features" / "index.json.gz").read_bytes()))
    assert len(raw["0"]["offsets"]) == 9 and raw["0"]["filename"].endswith(".bin")


def test_errors_name_the_feature(tmp_path):
    root = _hand_written_store(tmp_path / "a", zlib.compress)
    st = FeatureStore.open(root)
    for layer, f, words in [(0, 4, "missing"), (0, 99, "missing"), (5, 0, "no layer 5")]:
        with pytest.raises(FeatureStoreError, match=rf"feature {layer}/{f} \(cantor {cantor(layer, f)}\).*{words}"):
            st.record(layer, f)
    # truncated record: cut the last layer file in the middle of feature 5
    binf = root / "features" / "layer1.bin"
    binf.write_bytes(binf.read_bytes()[:-7])
    with pytest.raises(FeatureStoreError, match=r"feature 1/5 .*truncated"):
        FeatureStore.open(root).record(1, 5)
    # corrupt body
    data = bytearray((root / "features" / "layer0.bin").read_bytes())
    data[6:14] = b"\x00" * 8
    (root / "features" / "layer0.bin").write_bytes(bytes(data))
    with pytest.raises(FeatureStoreError, match=r"feature 0/0 .*corrupt"):
        FeatureStore.open(root).record(0, 0)
    # corrupt index
    (root / "features" / "index.json.gz").write_bytes(b"not gzip at all")
    with pytest.raises(FeatureStoreError, match="index.json.gz is corrupt"):
        FeatureStore.open(root).record(0, 1)
    with pytest.raises(FeatureStoreError, match="no index.json.gz"):
        FeatureStore.open(tmp_path)
    for exc in (FeatureStoreError,):
        try:
            FeatureStore.open(root).record(0, 1)
        except exc as e:
            assert "\n" not in str(e)


class _FakeHubFS:
    """Serves ``repo@rev/path`` from a local folder and counts the bytes each call asks for."""

    def __init__(self, root: Path):
        self.root, self.calls = root, []

    def cat_file(self, path: str, start: int | None = None, end: int | None = None) -> bytes:
        rel = path.split("/", 2)[2]
        self.calls.append((path, start, end))
        data = (self.root / rel).read_bytes()
        return data[start:end] if start is not None else data


def test_hub_range_reads_and_disk_cache(tmp_path):
    root = _hand_written_store(tmp_path / "repo", gzip.compress)
    fs = _FakeHubFS(root)
    rev = "0123456789abcdef0123456789abcdef01234567"
    st = FeatureStore.open(f"someone/clt-toy@{rev}", cache_dir=tmp_path / "cache", fs=fs)
    assert st.provenance == {"store": "someone/clt-toy", "revision": rev, "requested_revision": rev}
    assert st.record(1, 3) == _record(1, 3)
    ranges = [c for c in fs.calls if c[1] is not None]
    assert ranges and all(c[0] == f"someone/clt-toy@{rev}/features/layer1.bin" for c in ranges)
    size = (root / "features" / "layer1.bin").stat().st_size
    assert all(c[2] - c[1] < size for c in ranges)  # one record, never the whole file
    n = len(fs.calls)
    st2 = FeatureStore.open(f"someone/clt-toy@{rev}", cache_dir=tmp_path / "cache", fs=fs)
    assert st2.record(1, 3) == _record(1, 3) and len(fs.calls) == n  # index and record from the disk cache
    assert st2.record(0, 1) == _record(0, 1) and len(fs.calls) == n + 1


def test_cantor():
    assert [cantor(l, f) for l, f in [(0, 0), (1, 0), (0, 1), (3, 5)]] == [0, 1, 2, 41]
    assert all(cantor_unpair(cantor(l, f)) == (l, f) for l in range(30) for f in range(0, 40000, 997))


def test_pie_interpret_reads_a_reference_format_store(tiny_worlds, tmp_path, capsys, one_torch_thread):
    """`pie interpret --examples store --store DIR` on a fixture world, with a store laid out by hand."""
    from pie_lib.cli import main

    w = tiny_worlds["gpt2"]
    root = _hand_written_store(tmp_path / "store", _deflate)
    out = tmp_path / "interp"
    rc = main(
        [
            "interpret",
            "--features",
            "0:1,1:3",
            "--model",
            str(w.model_dir),
            "--clt",
            str(w.clt_dir),
            "--examples",
            "store",
            "--store",
            str(root),
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    import pandas as pd

    d = pd.read_parquet(out / "descriptions.parquet")
    assert sorted(zip(d.layer, d.feature)) == [(0, 1), (1, 3)] and (d.status == "ok").all()
    assert d.set_index(["layer", "feature"]).loc[(1, 3), "max_act"] == 3.0
    assert "f3" in d.set_index(["layer", "feature"]).loc[(1, 3), "description"]  # the example's peak token
    cfg = json.loads((out / "interpret_config.json").read_text())
    assert cfg["examples_source"] == "store" and cfg["store"]["store"] == str((root / "features").resolve())
    assert not (out / "examples").exists()  # nothing streamed
    # a feature the store lacks: one line naming it, nothing written
    rc = main(
        [
            "interpret",
            "--features",
            "0:4",
            "--model",
            str(w.model_dir),
            "--clt",
            str(w.clt_dir),
            "--examples",
            "store",
            "--store",
            str(root),
            "--out",
            str(tmp_path / "bad"),
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "feature 0/4 (cantor 14)" in err and "\n" not in err
    assert not (tmp_path / "bad").exists()


def test_toy_world_ships_its_store():
    from pie_lib.toy import toy_feature_store_path

    st = FeatureStore.open(toy_feature_store_path("llama"))
    ix = st.index()
    assert sorted(ix) == [0, 1, 2, 3] and all(len(v.offsets) == 512 + 1 for v in ix.values())
    have = [(l, f) for l in range(4) for f in range(512) if st.has(l, f)]
    assert len(have) > 1000
    rec = st.record(*have[0])
    ex = rec["examples_quantiles"][0]["examples"][0]
    assert len(ex["tokens"]) == len(ex["tokens_acts_list"]) and rec["act_max"] >= max(ex["tokens_acts_list"])
    assert len(rec["quantile_values"]) == 100 and 0 < rec["activation_frequency"] <= 1


def test_hub_failure_is_one_line(tmp_path):
    class Down:
        def cat_file(self, path, start=None, end=None):
            raise ConnectionError("Name or service not known\nmore lines")

    st = FeatureStore.open("someone/clt@" + "a" * 40, cache_dir=tmp_path, fs=Down())
    with pytest.raises(FeatureStoreError, match="cannot read someone/clt@a+/features/index.json.gz from the hub") as e:
        st.record(0, 0)
    assert "\n" not in str(e.value)


def test_default_store_for_toy_names():
    from pie_lib.interpret.feature_store import default_store_for
    from pie_lib.toy import toy_feature_store_path

    assert default_store_for(None) == default_store_for("toy") == toy_feature_store_path("llama")
    assert default_store_for("mntss/clt-llama-3.2-1b-524k") == "mntss/clt-llama-3.2-1b-524k"
    with pytest.raises(FeatureStoreError, match="llama CLT only, not toy:gpt2"):
        default_store_for("toy:gpt2")


def test_store_in_a_hub_snapshot_records_its_revision(tmp_path):
    sha = "89abcdef" * 5
    root = _hand_written_store(tmp_path / "models--someone--clt" / "snapshots" / sha, gzip.compress)
    st = FeatureStore.open(root)
    assert st.provenance["revision"] == sha and st.record(0, 0) == _record(0, 0)
