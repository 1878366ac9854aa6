"""circuit-tracer format: round trip, lazy row slicing, PLT sets, and clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file

from pie_lib.clt import load_clt, save_clt, save_transcoder
from pie_lib.clt.lazy import LazyDecoder, SafetensorsRows
from pie_lib.errors import CLTFormatError, WeightsUnavailableError

L, F, D = 3, 20, 8


def _tensors(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return dict(
        W_enc=torch.randn(L, F, D, generator=g).to(dtype),
        b_enc=torch.randn(L, F, generator=g).to(dtype),
        W_dec=[torch.randn(F, L - i, D, generator=g).to(dtype) for i in range(L)],
        b_dec=torch.randn(L, D, generator=g).to(dtype),
        threshold=torch.rand(L, F, generator=g).to(dtype),
    )


def _write_foreign(folder, t, with_threshold=True):
    """Write the format by hand, the way another tool would (not through save_clt)."""
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(
        yaml.safe_dump(
            {
                "model_kind": "cross_layer_transcoder",
                "feature_input_hook": "hook_resid_mid",
                "feature_output_hook": "hook_mlp_out",
                "model_name": "some/model",
            }
        )
    )
    for i in range(L):
        enc = {
            f"W_enc_{i}": t["W_enc"][i].contiguous(),
            f"b_enc_{i}": t["b_enc"][i].contiguous(),
            f"b_dec_{i}": t["b_dec"][i].contiguous(),
        }
        if with_threshold:
            enc[f"threshold_{i}"] = t["threshold"][i].contiguous()
        save_file(enc, str(folder / f"W_enc_{i}.safetensors"))
        save_file({f"W_dec_{i}": t["W_dec"][i].contiguous()}, str(folder / f"W_dec_{i}.safetensors"))
    return folder


@pytest.mark.parametrize("lazy", [False, True])
def test_round_trip_identical_tensors(tmp_path, lazy):
    t = _tensors()
    save_clt(tmp_path / "a", **t, model_name="x")
    clt = load_clt(tmp_path / "a", lazy=lazy)
    assert clt.config.activation == "jumprelu" and clt.threshold is not None
    assert torch.equal(clt.W_enc, t["W_enc"]) and torch.equal(clt.b_enc, t["b_enc"])
    assert torch.equal(clt.b_dec, t["b_dec"]) and torch.equal(clt.threshold, t["threshold"])
    for i in range(L):
        assert torch.equal(clt.decoder_rows(i, torch.arange(F)), t["W_dec"][i])
    save_transcoder(clt, tmp_path / "b")
    again = load_clt(tmp_path / "b")
    assert torch.equal(again.W_enc, clt.W_enc)
    assert torch.equal(again.decoder_rows(0, torch.arange(F)), t["W_dec"][0])


def test_foreign_folder_relu_and_bf16(tmp_path):
    t = _tensors(dtype=torch.bfloat16)
    _write_foreign(tmp_path / "c", t, with_threshold=False)
    clt = load_clt(tmp_path / "c", lazy=True)
    assert clt.config.activation == "relu" and clt.threshold is None
    idx = torch.tensor([7, 2, 7, 19])
    assert torch.equal(clt.decoder_rows(1, idx), t["W_dec"][1][idx])
    x = torch.randn(L, 4, D).to(torch.bfloat16)
    ref = torch.relu(torch.einsum("lnd,lfd->lnf", x.float(), t["W_enc"].float()) + t["b_enc"].float()[:, None])
    torch.testing.assert_close(clt.encode(x).float(), ref, atol=0.1, rtol=0.05)


def test_lazy_slicing_reads_only_requested_rows(tmp_path):
    t = _tensors()
    save_clt(tmp_path / "a", **t)
    mm = SafetensorsRows(tmp_path / "a" / "W_dec_0.safetensors", "W_dec_0")
    dec = LazyDecoder([mm], cache_rows=4)
    for idx in ([3, 1], [1, 5, 9], [0], [19, 18, 17, 16, 15]):  # forces cache resets too
        assert torch.equal(dec.rows(0, torch.tensor(idx)), t["W_dec"][0][idx])
    assert dec._used[0] <= max(4, 5)
    nocache = LazyDecoder([mm], cache_rows=0)
    assert torch.equal(nocache.rows(0, torch.tensor([4, 4, 2])), t["W_dec"][0][[4, 4, 2]])


def test_row_reads_exact_bounded_and_unmapped(tmp_path):
    """Rows come from positioned reads (runs of consecutive rows in one read): any order, repeats
    and runs give the file's rows; the cache stays within ``cache_bytes``; nothing is memory-mapped,
    so a sweep's resident set does not grow with the rows it has read; a truncated file is an error."""
    t = _tensors()
    save_clt(tmp_path / "a", **t)
    path = tmp_path / "a" / "W_dec_0.safetensors"
    mm = SafetensorsRows(path, "W_dec_0")
    full = t["W_dec"][0]
    for idx in ([0, 1, 2, 3], [5, 3, 3, 9], [19], list(range(20))):
        assert torch.equal(mm.rows(np.array(idx)), full[idx])
    assert torch.equal(mm.full(), full)
    maps = Path("/proc/self/maps")
    if maps.exists():
        assert str(path) not in maps.read_text()
    row_bytes = full[0].numel() * full.element_size()
    dec = LazyDecoder([mm], cache_bytes=3 * row_bytes)
    assert torch.equal(dec.rows(0, torch.tensor([1, 2])), full[[1, 2]])
    assert torch.equal(dec.rows(0, torch.tensor([4, 2, 7])), full[[4, 2, 7]])  # over budget: cache reset
    assert dec._blocks[0] is not None and dec._blocks[0].shape[0] == 3
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - row_bytes // 2])
    with pytest.raises(CLTFormatError, match="truncated"):
        SafetensorsRows(path, "W_dec_0").rows(np.array([0]))


def test_topk_config(tmp_path):
    t = _tensors()
    t["threshold"] = None
    save_clt(tmp_path / "k", **t, extra_config={"activation": "topk", "k": 2})
    clt = load_clt(tmp_path / "k")
    acts = clt.encode(torch.randn(L, 5, D) * 3)
    assert ((acts != 0).sum(-1) <= 2).all()


def test_plt_layout_loads_as_single_target(tmp_path):
    folder = tmp_path / "plt"
    folder.mkdir()
    (folder / "config.yaml").write_text(
        "model_kind: transcoder_set\nfeature_input_hook: hook_resid_mid\nfeature_output_hook: hook_mlp_out\n"
    )
    g = torch.Generator().manual_seed(1)
    decs = []
    for i in range(L):
        W_dec = torch.randn(F, D, generator=g)
        decs.append(W_dec)
        save_file(
            {
                "W_enc": torch.randn(F, D, generator=g),
                "W_dec": W_dec,
                "b_enc": torch.zeros(F),
                "b_dec": torch.zeros(D),
                "activation_function.threshold": torch.full((F,), 0.1),
            },
            str(folder / f"layer_{i}.safetensors"),
        )
    clt = load_clt(folder)
    assert not clt.config.is_cross_layer and clt.n_out(0) == 1 and list(clt.targets(1)) == [1]
    assert torch.equal(clt.decoder_rows(2, torch.tensor([3]))[:, 0], decs[2][[3]])
    acts = clt.encode(torch.randn(L, 2, D))
    recon = clt.decode(acts)
    torch.testing.assert_close(recon[1], acts[1] @ decs[1])


def test_missing_layer_file(tmp_path):
    save_clt(tmp_path / "a", **_tensors())
    (tmp_path / "a" / "W_dec_1.safetensors").unlink()
    with pytest.raises(CLTFormatError, match="missing"):
        load_clt(tmp_path / "a")


def test_truncated_file(tmp_path):
    save_clt(tmp_path / "a", **_tensors())
    p = tmp_path / "a" / "W_dec_2.safetensors"
    p.write_bytes(p.read_bytes()[:100])
    with pytest.raises(CLTFormatError, match="W_dec_2.safetensors.*(truncated|corrupt)"):
        load_clt(tmp_path / "a")


def test_corrupt_header(tmp_path):
    save_clt(tmp_path / "a", **_tensors())
    p = tmp_path / "a" / "W_enc_0.safetensors"
    p.write_bytes(b"garbage!" + p.read_bytes()[8:])
    with pytest.raises(CLTFormatError, match="W_enc_0.safetensors"):
        load_clt(tmp_path / "a")


def test_wrong_shapes(tmp_path):
    t = _tensors()
    _write_foreign(tmp_path / "a", t)
    save_file({"W_dec_1": torch.zeros(F, L, D)}, str(tmp_path / "a" / "W_dec_1.safetensors"))
    with pytest.raises(CLTFormatError, match=r"W_dec_1 has shape \(20, 3, 8\), expected \(20, 2, 8\)"):
        load_clt(tmp_path / "a")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nan_weights(tmp_path, bad):
    t = _tensors()
    t["W_enc"][1, 3, 2] = bad
    _write_foreign(tmp_path / "a", t)
    with pytest.raises(CLTFormatError, match="NaN or Inf"):
        load_clt(tmp_path / "a")


def test_unknown_hub_id_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(
        WeightsUnavailableError, match="'nobody/no-such-clt': weights not reachable -- the hub is switched off here"
    ):
        load_clt("nobody/no-such-clt")
    with pytest.raises(WeightsUnavailableError, match="no such local folder"):
        load_clt(str(tmp_path / "does" / "not" / "exist"))
