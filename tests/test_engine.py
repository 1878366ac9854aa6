"""The architecture table, nnsight traces, splice identity, gradients and remote simulation."""

from __future__ import annotations

import copy

import pytest
import torch

from pie_lib.clt import fvu, mean_l0
from pie_lib.engine.traces import mlp_out_gradients, patched_last_logits, run_with_cache, spliced_last_logits
from pie_lib.errors import ShapeMismatchError, UnknownArchitectureError
from pie_lib.models.arch import ARCHITECTURES, arch_for, get_path

ARCHS = ["llama", "gemma2", "gpt2"]


def _ids(world, n=3):
    texts = [p.text_clean for p in world.pairs if len(p.text_clean.split()) == 6][:n]
    return torch.tensor(world.model.tokenize(texts))


def _torch_hook_capture(model, ids):
    """Independent capture with plain torch hooks: input of resid_mid, output of mlp_out."""
    hf, arch = model.hf, model.arch
    resid, outs, handles = [], [], []
    for layer in get_path(hf, arch.layers):
        handles.append(
            get_path(layer, arch.resid_mid).register_forward_hook(lambda m, i, o: resid.append(i[0].detach()))
        )
        handles.append(get_path(layer, arch.mlp_out).register_forward_hook(lambda m, i, o: outs.append(o.detach())))
    with torch.no_grad():
        logits = hf(ids).logits
    for h in handles:
        h.remove()
    return torch.stack(resid), torch.stack(outs), logits[:, -1]


@pytest.mark.parametrize("arch", ARCHS)
def test_hook_table_matches_plain_torch_hooks(tiny_worlds, arch):
    w = tiny_worlds[arch]
    ids = _ids(w)
    cache = run_with_cache(w.model, ids)
    resid, outs, last = _torch_hook_capture(w.model, ids)
    assert cache.resid_mid.shape == (w.model.n_layers, ids.shape[0], ids.shape[1], w.model.d_model)
    torch.testing.assert_close(cache.resid_mid, resid)
    torch.testing.assert_close(cache.mlp_out, outs)
    torch.testing.assert_close(cache.last_logits, last)


def test_unknown_architecture_is_a_clear_error():
    with pytest.raises(UnknownArchitectureError, match="LlamaForCausalLM.*Gemma2ForCausalLM.*GPT2LMHeadModel"):
        arch_for("MambaForCausalLM")
    assert arch_for("Gemma2ForCausalLM") is ARCHITECTURES["gemma2"]


@pytest.mark.parametrize("arch", ARCHS)
def test_splice_with_error_reproduces_model_logits(tiny_worlds, arch):
    w = tiny_worlds[arch]
    ids = _ids(w)
    cache = run_with_cache(w.model, ids)
    acts = w.clt.encode(cache.resid_mid)
    assert (acts != 0).any(), "the test CLT should have active features"
    error = cache.mlp_out - w.clt.decode(acts)
    spliced = spliced_last_logits(w.model, w.clt, ids, error)
    torch.testing.assert_close(spliced, cache.last_logits, atol=1e-5, rtol=0)
    # the splice must actually route through the CLT: a wrong error term changes the logits
    wrong = spliced_last_logits(w.model, w.clt, ids, error * 0)
    assert (wrong - cache.last_logits).abs().max() > 1e-3


def test_fvu_and_l0_against_independent_computation(llama_world):
    w = llama_world
    ids = _ids(w)
    cache = run_with_cache(w.model, ids)
    acts = w.clt.encode(cache.resid_mid)
    recon = w.clt.decode(acts)
    # independent: explicit loops over source/target layers with full decoders
    L = w.clt.n_layers
    manual = []
    for s in range(L):
        r = w.clt.b_dec[s].expand_as(cache.mlp_out[s]).clone()
        for l in range(s + 1):
            W = w.clt.decoder_rows(l, torch.arange(w.clt.n_features))[:, s - l]
            r = r + acts[l] @ W
        t = cache.mlp_out[s].reshape(-1, w.model.d_model)
        e = ((t - r.reshape(-1, w.model.d_model)) ** 2).sum() / ((t - t.mean(0)) ** 2).sum()
        manual.append(float(e))
    torch.testing.assert_close(fvu(recon, cache.mlp_out), torch.tensor(manual), rtol=1e-4, atol=1e-6)
    l0 = mean_l0(acts)
    assert torch.allclose(l0, (acts != 0).sum(-1).float().mean(dim=(1, 2)))


@pytest.mark.parametrize("arch", ARCHS)
def test_full_gradient_matches_finite_difference(tiny_worlds, arch):
    w = tiny_worlds[arch]
    ids = _ids(w, 2)
    correct, wrong = torch.tensor([5, 6]), torch.tensor([7, 8])
    g, m = mlp_out_gradients(w.model, ids, correct, wrong, mode="full")
    cache = run_with_cache(w.model, ids)
    off = torch.zeros_like(cache.mlp_out)
    off[1, :, 3] = torch.randn(2, w.model.d_model, generator=torch.Generator().manual_seed(0)) * 1e-3
    plus, _ = patched_last_logits(w.model, ids, off)
    minus, _ = patched_last_logits(w.model, ids, -off)
    rows = [0, 1]
    dm = ((plus[rows, correct] - plus[rows, wrong]) - (minus[rows, correct] - minus[rows, wrong])) / 2
    torch.testing.assert_close(dm, -(g[1, :, 3] * off[1, :, 3]).sum(-1), rtol=2e-2, atol=1e-7)


@pytest.mark.parametrize("arch", ARCHS)
def test_gradient_modes_differ_where_they_should(tiny_worlds, arch):
    w = tiny_worlds[arch]
    ids = _ids(w, 2)
    c, wr = torch.tensor([5, 6]), torch.tensor([7, 8])
    rep, m1 = mlp_out_gradients(w.model, ids, c, wr, mode="replacement")
    full, m2 = mlp_out_gradients(w.model, ids, c, wr, mode="full")
    relp, m3 = mlp_out_gradients(w.model, ids, c, wr, mode="relp")
    torch.testing.assert_close(m1, m2)
    torch.testing.assert_close(m1, m3)
    L = w.model.n_layers
    # at the last layer only the final norm and unembedding lie downstream: replacement = relp
    torch.testing.assert_close(rep[L - 1], relp[L - 1], rtol=1e-4, atol=1e-7)
    assert not torch.allclose(rep[0], full[0], atol=1e-6)
    assert not torch.allclose(rep[0], relp[0], atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_traces_under_nnsight_remote_simulation(tiny_worlds, arch):
    w = tiny_worlds[arch]
    ids = _ids(w, 2)
    local = copy.copy(w.model)
    sim = copy.copy(w.model)
    sim.remote = "local"
    a, b = run_with_cache(local, ids), run_with_cache(sim, ids)
    torch.testing.assert_close(a.resid_mid, b.resid_mid)
    torch.testing.assert_close(a.last_logits, b.last_logits)
    c, wr = torch.tensor([5, 6]), torch.tensor([7, 8])
    g1, _ = mlp_out_gradients(local, ids, c, wr, mode="replacement")
    g2, _ = mlp_out_gradients(sim, ids, c, wr, mode="replacement")
    torch.testing.assert_close(g1, g2)
    off = torch.randn_like(a.mlp_out) * 0.01
    torch.testing.assert_close(patched_last_logits(local, ids, off)[0], patched_last_logits(sim, ids, off)[0])


def test_clt_shape_mismatch_with_model_is_clear(tiny_worlds):
    with pytest.raises(ShapeMismatchError, match="d_model|layers"):
        tiny_worlds["llama"].model.check_clt(tiny_worlds["gemma2"].clt) if tiny_worlds[
            "gemma2"
        ].clt.n_layers != 3 else _mismatch(tiny_worlds)


def _mismatch(worlds):
    clt = copy.copy(worlds["llama"].clt)
    clt.W_enc = clt.W_enc[:2]
    worlds["llama"].model.check_clt(clt)


def test_foreign_clt_on_gpt2_reconstructs_with_independent_fvu(tiny_worlds, tmp_path):
    """A CLT folder written by hand (as another tool would), on a GPT-2 model in a local folder:
    pie_lib's FVU equals a numpy computation from the raw safetensors and hooks."""
    import numpy as np
    import yaml
    from safetensors.numpy import load_file, save_file

    from pie_lib.clt import load_clt
    from pie_lib.models.loading import load_model

    w = tiny_worlds["gpt2"]
    folder = tmp_path / "foreign"
    folder.mkdir()
    (folder / "config.yaml").write_text(
        yaml.safe_dump(
            {
                "model_kind": "cross_layer_transcoder",
                "feature_input_hook": "hook_resid_mid",
                "feature_output_hook": "hook_mlp_out",
            }
        )
    )
    for i in range(w.clt.n_layers):
        src_enc = load_file(str(w.clt_dir / f"W_enc_{i}.safetensors"))
        save_file({k: v.copy() for k, v in src_enc.items()}, str(folder / f"W_enc_{i}.safetensors"))
        save_file(load_file(str(w.clt_dir / f"W_dec_{i}.safetensors")), str(folder / f"W_dec_{i}.safetensors"))
    model = load_model(w.model_dir, device="cpu")
    clt = load_clt(folder)
    ids = _ids(w)
    cache = run_with_cache(model, ids)
    ours = fvu(clt.decode(clt.encode(cache.resid_mid)), cache.mlp_out)
    resid, outs, _ = _torch_hook_capture(model, ids)
    L = clt.n_layers
    acts = []
    for l in range(L):
        t = load_file(str(folder / f"W_enc_{l}.safetensors"))
        pre = resid[l].numpy().astype(np.float64) @ t[f"W_enc_{l}"].T.astype(np.float64) + t[f"b_enc_{l}"]
        acts.append(pre * (pre > t[f"threshold_{l}"]))
    expected = []
    for s in range(L):
        rec = load_file(str(folder / f"W_enc_{s}.safetensors"))[f"b_dec_{s}"].astype(np.float64)
        rec = rec + sum(
            acts[l] @ load_file(str(folder / f"W_dec_{l}.safetensors"))[f"W_dec_{l}"][:, s - l] for l in range(s + 1)
        )
        y = outs[s].numpy().astype(np.float64).reshape(-1, rec.shape[-1])
        r = rec.reshape(-1, y.shape[-1])
        expected.append(((y - r) ** 2).sum() / ((y - y.mean(0)) ** 2).sum())
    np.testing.assert_allclose(ours.numpy(), np.array(expected), rtol=1e-4)
