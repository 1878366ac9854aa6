"""The shipped toy world: models, tokenizer and CLTs load and do what toy_world.json says.

Nothing is trained here; every number is recomputed from the shipped files on fresh held-out data
(seeds different from the build's evaluation seed).
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pie_lib.clt import load_clt
from pie_lib.toy import ARCHS, TOY_ROOT, toy_clt_path, toy_model_path, toy_summary
from pie_lib.toy.build import active_occurrences, folder_bytes
from pie_lib.toy.corpus import heldout_docstring_pairs, heldout_ioi_pairs, heldout_texts
from pie_lib.toy.train_clt import corpus_activations, evaluate_clt
from pie_lib.toy.train_lm import task_accuracy

TEST_SEED = 2024  # not the build's EVAL_SEED: fresh held-out pairs and text


def _require_assets() -> None:
    missing = [
        p for a in ARCHS for p in (toy_model_path(a) / "config.json", toy_clt_path(a) / "config.yaml") if not p.exists()
    ]
    if missing:
        pytest.fail(f"toy world assets missing ({missing[0]}); rebuild with `python -m pie_lib.toy.build`")


@pytest.fixture(scope="module", params=ARCHS)
def world(request) -> dict:
    _require_assets()
    torch.manual_seed(0)
    arch = request.param
    tok = AutoTokenizer.from_pretrained(toy_model_path(arch))
    model = AutoModelForCausalLM.from_pretrained(toy_model_path(arch)).eval()
    return {
        "arch": arch,
        "tok": tok,
        "model": model,
        "clt": load_clt(toy_clt_path(arch)),
        "json": toy_summary()["archs"][arch],
    }


def test_paths_and_unknown_arch() -> None:
    assert ARCHS == ("llama", "gpt2")
    assert toy_model_path() == TOY_ROOT / "llama" / "model" and toy_clt_path("gpt2") == TOY_ROOT / "gpt2" / "clt"
    with pytest.raises(ValueError, match="llama, gpt2"):
        toy_model_path("gpt3")
    with pytest.raises(ValueError, match="valid archs"):
        toy_clt_path("mistral")


def test_asset_budget() -> None:
    _require_assets()
    total = folder_bytes(TOY_ROOT)
    assert total <= 15 * 1024 * 1024, f"toy assets are {total / 1e6:.1f} MB (> 15 MB)"
    summary = toy_summary()
    assert set(summary["archs"]) == set(ARCHS)


def test_tokenizer(world) -> None:
    tok = world["tok"]
    mary = tok.convert_tokens_to_ids("Mary")
    assert tok.bos_token == "<bos>" and tok.pad_token == "<pad>" and tok.unk_token == "<unk>"
    assert tok(" Mary")["input_ids"] == [tok.bos_token_id, mary]
    assert tok(" Mary", add_special_tokens=False)["input_ids"] == [mary]
    assert len(tok) == world["json"]["vocab_size"] == world["model"].config.vocab_size


def test_task_accuracy(world) -> None:
    model, tok, js = world["model"], world["tok"], world["json"]
    ioi = task_accuracy(model, tok, heldout_ioi_pairs(tok, 200, seed=TEST_SEED).pairs)
    doc = task_accuracy(model, tok, heldout_docstring_pairs(tok, 200, seed=TEST_SEED).pairs)
    assert ioi >= 0.95, f"{world['arch']}: held-out IOI accuracy {ioi:.3f}"
    assert doc >= 0.80, f"{world['arch']}: held-out Doc-String accuracy {doc:.3f}"
    assert abs(ioi - js["ioi_acc"]) <= 0.06 and abs(doc - js["docstring_acc"]) <= 0.08


def test_clt_reconstruction(world) -> None:
    model, tok, clt, js = world["model"], world["tok"], world["clt"], world["json"]
    assert clt.config.activation == "jumprelu" and clt.threshold is not None
    assert clt.config.feature_input_hook == "hook_resid_mid" and clt.config.feature_output_hook == "hook_mlp_out"
    L = model.config.num_hidden_layers
    assert (clt.n_layers, clt.d_model, clt.n_features) == (L, model.config.hidden_size, js["n_features"])
    assert [clt.n_out(l) for l in range(L)] == [L - l for l in range(L)]
    x, y = corpus_activations(model, tok, heldout_texts(150, seed=TEST_SEED))
    fvus, l0s = evaluate_clt(clt, x, y)
    assert all(v <= 0.15 for v in fvus), f"{world['arch']}: per-layer FVU {fvus}"
    assert all(v > 0 for v in l0s), f"{world['arch']}: per-layer L0 {l0s}"
    for got, want in zip(fvus, js["fvu"]):
        assert abs(got - want) <= 0.05
    for got, want in zip(l0s, js["l0"]):
        assert abs(got - want) <= 0.3 * want + 1


def test_active_set_size(world) -> None:
    tok = world["tok"]
    pairs = heldout_ioi_pairs(tok, 10, seed=TEST_SEED).pairs
    counts = active_occurrences(world["model"], tok, world["clt"], pairs)
    assert min(counts) > 100, f"{world['arch']}: active occurrences per IOI pair {counts}"
    mean = sum(counts) / len(counts)
    assert abs(mean - world["json"]["ioi_active_occurrences_mean"]) <= 0.3 * mean
