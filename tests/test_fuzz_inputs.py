"""Property-based fuzzing (hypothesis, a dev-only dependency) of the readers of user files.

Arbitrary bytes and arbitrary JSON given to the pairs JSONL loader, the results JSONL reader and
the CLT ``config.yaml`` reader either parse or raise a :class:`PieError` (a one-line message) --
never any other exception, which the CLI would show as an internal error.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import yaml

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from pie_lib.clt.io import read_config  # noqa: E402
from pie_lib.data.pairs import REQUIRED_KEYS, load_pairs  # noqa: E402
from pie_lib.errors import PieError  # noqa: E402
from pie_lib.store import read_jsonl, repair_jsonl  # noqa: E402

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=20,
)
#: Objects shaped like pairs / configs, with each known key missing or holding any JSON value.
pair_like = st.fixed_dictionaries({}, optional={k: json_values | st.text(max_size=30) for k in REQUIRED_KEYS})
config_like = st.fixed_dictionaries(
    {},
    optional={
        "model_kind": st.sampled_from(["cross_layer_transcoder", "transcoder_set", "sae"]) | json_values,
        "feature_input_hook": st.sampled_from(["hook_resid_mid", "blocks.{layer}.hook_resid_mid", "mlp.hook_in"])
        | json_values,
        "feature_output_hook": st.sampled_from(["hook_mlp_out", "x"]) | json_values,
        "activation": st.sampled_from(["relu", "jumprelu", "topk", "jump_relu", "gelu"]) | json_values,
        "k": st.integers(-3, 100) | json_values,
        "model_name": json_values,
    },
)


#: every example's folder lives under one root, removed when the test process ends (hypothesis runs
#: hundreds of examples; a folder each in /tmp would be left behind)
_ROOT = tempfile.TemporaryDirectory(prefix="pie_fuzz_")


def _file(data: bytes, name: str) -> Path:
    folder = Path(tempfile.mkdtemp(dir=_ROOT.name))
    path = folder / name
    path.write_bytes(data)
    return path


def _only_pie_errors(fn, *args):
    try:
        return fn(*args)
    except PieError as exc:
        msg = str(exc)
        assert msg.strip() and "\n" not in msg.strip(), f"multi-line error: {msg!r}"
        return None


@SETTINGS
@given(st.binary(max_size=400))
def test_pairs_loader_arbitrary_bytes(data):
    pairs = _only_pie_errors(load_pairs, _file(data, "pairs.jsonl"))
    for p in pairs or []:
        assert all(isinstance(getattr(p, k), str) and getattr(p, k) for k in REQUIRED_KEYS)


@SETTINGS
@given(st.lists(json_values | pair_like, min_size=1, max_size=4))
def test_pairs_loader_arbitrary_json(objs):
    text = "".join(json.dumps(o) + "\n" for o in objs)
    pairs = _only_pie_errors(load_pairs, _file(text.encode(), "pairs.jsonl"))
    if pairs is not None:
        assert len(pairs) == len(objs)


@SETTINGS
@given(st.binary(max_size=400))
def test_results_reader_and_repair_arbitrary_bytes(data):
    path = _file(data, "results.jsonl")
    rows = _only_pie_errors(read_jsonl, path)
    assert all(isinstance(r, dict) for r in rows or [])
    cut = repair_jsonl(path)
    after = path.read_bytes()
    # repair only ends the file at a row boundary: it never rewrites or drops a complete row
    assert after in (data, data + b"\n", data[: len(data) - cut])
    assert not after or after.endswith(b"\n")
    if rows is not None:
        assert read_jsonl(path) == rows


@SETTINGS
@given(st.binary(max_size=300))
def test_clt_config_reader_arbitrary_bytes(data):
    _only_pie_errors(read_config, _file(data, "config.yaml").parent)


@SETTINGS
@given(json_values | config_like)
def test_clt_config_reader_arbitrary_json(obj):
    folder = _file(json.dumps(obj).encode(), "config.yaml").parent  # JSON is YAML
    cfg = _only_pie_errors(read_config, folder)
    (folder / "config.yaml").write_text(yaml.safe_dump(obj))
    cfg2 = _only_pie_errors(read_config, folder)
    for c in (cfg, cfg2):
        if c is not None:
            assert c.model_kind in ("cross_layer_transcoder", "transcoder_set")
            assert c.activation in ("relu", "jumprelu", "topk")
            assert c.activation != "topk" or (isinstance(c.k, int) and c.k > 0)


def test_deep_nesting_is_an_error_not_a_crash(tmp_path):
    (tmp_path / "p.jsonl").write_text("[" * 100_000 + "\n")
    with pytest.raises(PieError, match=r"p\.jsonl:1: invalid JSON"):
        load_pairs(tmp_path / "p.jsonl")
    (tmp_path / "r.jsonl").write_text("[" * 100_000 + "\n")
    with pytest.raises(PieError, match=r"r\.jsonl:1: corrupt line"):
        read_jsonl(tmp_path / "r.jsonl")
    (tmp_path / "config.yaml").write_text("[" * 100_000 + "\n")
    with pytest.raises(PieError, match=r"config\.yaml: invalid YAML"):
        read_config(tmp_path)
