"""The native model backend (pie_lib.models.native) against transformers, bit for bit on a CPU in float32.

Every comparison is ``torch.equal``: the native modules run transformers 5.24's operations in its
order, so any reordering (another mask path in SDPA, another matmul shape, another GELU) fails here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pie_lib.engine import traces
from pie_lib.errors import PieError, SettingError
from pie_lib.models.arch import ARCHITECTURES
from pie_lib.models.loading import load_model
from pie_lib.models.native import NATIVE_ARCHS
from pie_lib.models.random_init import save_random_model
from pie_lib.toy import toy_model_path

WORDS = [f"w{i}" for i in range(40)]
#: random configs that exercise what the toy models do not: GQA, untied head, llama3 RoPE, GPT-2 scalings
RANDOM = {
    "llama-gqa-untied": ("llama", dict(num_key_value_heads=2, tie_word_embeddings=False)),
    "llama-llama3-rope": (
        "llama",
        dict(
            num_key_value_heads=1,
            head_dim=8,
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=10000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=100,
            ),
        ),
    ),
    "gpt2-inverse-layer-scaling": ("gpt2", dict(scale_attn_by_inverse_layer_idx=True, n_inner=48)),
    # sliding window 16 (random_init.SMALL), soft-caps 50 / 30; a longer prompt than the window below
    "gemma2": ("gemma2", dict(num_hidden_layers=4)),
}


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    yield


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    out = {"toy-gpt2": toy_model_path("gpt2"), "toy-llama": toy_model_path("llama")}
    root = tmp_path_factory.mktemp("native")
    for name, (arch, overrides) in RANDOM.items():
        out[name] = save_random_model(root / name, arch, WORDS, seed=3, **overrides)
    return out


@pytest.fixture(scope="module")
def pairs(folders):
    """(native, hf) LoadedModel per folder name."""
    return {
        n: (load_model(f, device="cpu", backend="native"), load_model(f, device="cpu", backend="hf"))
        for n, f in folders.items()
    }


NAMES = ["toy-gpt2", "toy-llama", *RANDOM]


def _ids(model, B: int, T: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, model.vocab_size, (B, T), generator=g)


def test_every_arch_spec_says_whether_it_is_native():
    assert {n for n, s in ARCHITECTURES.items() if s.native} == set(NATIVE_ARCHS)


@pytest.mark.parametrize("name", NAMES)
def test_same_tree_parameters_and_logits(pairs, name):
    nat, hf = pairs[name]
    assert nat.backend == "native" and hf.backend == "hf"
    assert [n for n, _ in nat.hf.named_modules()] == [n for n, _ in hf.hf.named_modules()]
    hp = dict(hf.hf.named_parameters())
    for n, p in nat.hf.named_parameters():
        assert torch.equal(p, hp[n]), n
        assert not p.requires_grad
    assert len(hp) == len(dict(nat.hf.named_parameters()))
    head, emb = nat.hf.get_output_embeddings().weight, nat.hf.get_input_embeddings().weight
    assert (head is emb) == bool(nat.config.tie_word_embeddings)
    for T in (1, 2, 5, 15, 33, 40):
        ids = _ids(nat, 3, T, T)
        with torch.no_grad():
            for keep in (0, 1):
                a = nat.hf(input_ids=ids, logits_to_keep=keep).logits
                b = hf.hf(input_ids=ids, attention_mask=torch.ones_like(ids), logits_to_keep=keep).logits
                assert torch.equal(a, b), (name, T, keep)


@pytest.mark.parametrize("name", NAMES)
def test_left_padded_batch(pairs, name):
    nat, hf = pairs[name]
    ids = _ids(nat, 3, 12, 1)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :7] = 0
    with torch.no_grad():
        a = nat.hf(input_ids=ids, attention_mask=mask).logits
        b = hf.hf(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    assert torch.equal(a[real], b[real])


@pytest.mark.parametrize("name", NAMES)
def test_engine_traces_agree(pairs, name):
    """Caches, patched forwards, cached suffixes (positions and skipped layers) and all three gradients."""
    nat, hf = pairs[name]
    L, D = nat.n_layers, nat.d_model
    # Gemma-2: below its sliding window (16 here): transformers' cache keeps only the window's last
    # keys of a sliding layer, so its prefix cache of a longer prompt is not the prompt's
    for T in (9, 15) if name == "gemma2" else (9, 37):
        ids = _ids(nat, 4, T, 7 + T)
        a, b = traces.run_with_cache(nat, ids), traces.run_with_cache(hf, ids)
        assert torch.equal(a.resid_mid, b.resid_mid) and torch.equal(a.mlp_out, b.mlp_out)
        assert torch.equal(a.last_logits, b.last_logits)
        pa, pb = traces.clean_prefix_cache(nat, ids), traces.clean_prefix_cache(hf, ids)
        for (ka, va), (kb, vb) in zip(pa.kv, pb.kv):
            assert torch.equal(ka, kb) and torch.equal(va, vb)
        g = torch.Generator().manual_seed(T)
        off = torch.randn(L, 4, T, D, generator=g) * 0.1
        x, _ = traces.patched_last_logits(nat, ids, off)
        y, _ = traces.patched_last_logits(hf, ids, off)
        assert torch.equal(x, y)
        _, la = traces.patched_last_logits(nat, ids, off, with_logsumexp=True)
        _, lb = traces.patched_last_logits(hf, ids, off, with_logsumexp=True)
        assert la is not None and lb is not None and torch.equal(la, lb)
        rows = torch.tensor([0, 1, 1, 3])
        for first_changed, layer in ((1, 0), (4, 1), (T - 1, 0), (T - 1, L - 1)):
            start = traces.exact_suffix_start(T, first_changed)
            o = off.clone()
            o[:, :, :start] = 0
            o[:layer] = 0
            x, _ = traces.patched_last_logits(nat, ids, o[:, :, start:], prefix=traces.Prefix(pa, rows, start, layer))
            y, _ = traces.patched_last_logits(hf, ids, o[:, :, start:], prefix=traces.Prefix(pb, rows, start, layer))
            assert torch.equal(x, y), (start, layer)
            if name.startswith("toy"):  # GQA suffixes take another SDPA path than full forwards, in hf too
                full, _ = traces.patched_last_logits(hf, ids[rows], o)
                assert torch.equal(x, full), (start, layer)
        for mode in ("replacement", "full", "relp"):
            for metric in ("logit_diff", "logsumexp"):
                ga, ma = traces.mlp_out_gradients(nat, ids, ids[:, 1], ids[:, 2], metric=metric, mode=mode)
                gb, mb = traces.mlp_out_gradients(hf, ids, ids[:, 1], ids[:, 2], metric=metric, mode=mode)
                assert torch.equal(ga, gb) and torch.equal(ma, mb), (mode, metric)


def test_auto_picks_native_for_local_folders_it_supports(folders, tmp_path):
    assert load_model(folders["toy-gpt2"], device="cpu").backend == "native"
    assert load_model(folders["toy-llama"], device="cpu").backend == "native"
    assert load_model(folders["gemma2"], device="cpu").backend == "native"
    other = save_random_model(
        tmp_path / "dyn", "llama", WORDS, seed=0, rope_parameters=dict(rope_type="dynamic", rope_theta=1e4, factor=2.0)
    )
    assert load_model(other, device="cpu").backend == "hf"
    with pytest.raises(SettingError, match="RoPE type 'dynamic'"):
        load_model(other, device="cpu", backend="native")


def test_native_refusals(folders):
    with pytest.raises(SettingError, match="--remote"):
        load_model(folders["toy-gpt2"], device="cpu", backend="native", remote=True)
    with pytest.raises(SettingError, match="local model folder"):
        load_model("owner/some-model", device="cpu", backend="native")
    with pytest.raises(SettingError, match="model backend 'fast'"):
        load_model(folders["toy-gpt2"], device="cpu", backend="fast")


def test_native_does_not_generate(pairs):
    from pie_lib.engine.generation import steered_greedy

    nat, _ = pairs["toy-llama"]
    ids = _ids(nat, 2, 5, 0)
    with pytest.raises(SettingError, match="native model backend does not do"):
        steered_greedy(nat, [(ids, torch.zeros(nat.n_layers, 2, 5, nat.d_model))], 3)


def test_native_weights_are_process_memory(tmp_path):
    """No mapping of the safetensors file stays behind, and the weights are the file's."""
    folder = save_random_model(tmp_path / "m", "llama", WORDS, seed=1)
    m = load_model(folder, device="cpu", backend="native")
    maps = Path("/proc/self/maps")
    if maps.exists():
        assert str(folder / "model.safetensors") not in maps.read_text()
    from safetensors.torch import load_file

    ref = load_file(str(folder / "model.safetensors"))
    params = dict(m.hf.named_parameters())
    for k, v in ref.items():
        assert torch.equal(params[k], v), k


def test_mismatched_weights_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = save_random_model(tmp_path / "m", "gpt2", WORDS, seed=1)
    w = load_file(str(folder / "model.safetensors"))
    w.pop("transformer.h.0.mlp.c_fc.bias")
    save_file(w, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(PieError, match=r"missing transformer\.h\.0\.mlp\.c_fc\.bias"):
        load_model(folder, device="cpu", backend="native")


def test_prune_path_imports_no_modeling_stack():
    """Loading the toy worlds the way ``pie prune`` does imports none of transformers' modeling code."""
    code = (
        "import sys\n"
        "from pie_lib.prune.sweep import run_prune\n"
        "from pie_lib.world import load_world\n"
        "from pie_lib.engine.traces import run_with_cache\n"
        "import torch\n"
        "for arch in ('gpt2', 'llama'):\n"
        "    w = load_world(f'toy:{arch}', f'toy:{arch}', device='cpu')\n"
        "    assert w.model.backend == 'native', w.model.backend\n"
        "    run_with_cache(w.model, torch.tensor([[2, 5, 6, 7]]))\n"
        "heavy = ('transformers.modeling_utils', 'torch._dynamo', 'torch.distributed.tensor', 'sympy',\n"
        "         'scipy.optimize', 'transformers.models.gpt2.modeling_gpt2', 'transformers.models.llama.modeling_llama')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    assert out.strip().splitlines()[-1] == "[]", out


@pytest.mark.parametrize("name", NAMES)
def test_config_reader_matches_transformers(folders, name):
    """The native config reader gives transformers' values for every attribute pie_lib reads."""
    from transformers import AutoConfig

    from pie_lib.models.native.config import native_config, read_config_json

    values = read_config_json(folders[name])
    assert values is not None
    mine, theirs = native_config(values), AutoConfig.from_pretrained(folders[name])
    assert mine is not None
    for attr in (*mine.__dict__, "hidden_size", "num_hidden_layers", "num_attention_heads", "max_position_embeddings"):
        if attr in ("arch", "architectures", "transformers_version", "dtype", "model_type") or not hasattr(
            theirs, attr
        ):
            continue
        assert getattr(mine, attr) == getattr(theirs, attr), attr
    assert getattr(mine, "intermediate_size", None) == getattr(theirs, "intermediate_size", None)


def test_config_reader_moves_old_rope_keys():
    """Llama-3 config.json files carry ``rope_theta`` and ``rope_scaling`` at the top level."""
    from transformers import LlamaConfig

    from pie_lib.models.native.config import native_config

    values = dict(
        model_type="llama",
        hidden_size=64,
        num_attention_heads=4,
        num_hidden_layers=2,
        rope_theta=500000.0,
        max_position_embeddings=2048,
        rope_scaling=dict(
            factor=32.0,
            high_freq_factor=4.0,
            low_freq_factor=1.0,
            original_max_position_embeddings=8192,
            rope_type="llama3",
        ),
    )
    mine = native_config(values)
    assert mine is not None
    assert mine.rope_parameters == LlamaConfig(**{k: v for k, v in values.items() if k != "model_type"}).rope_parameters


@pytest.mark.parametrize("name", NAMES)
def test_same_tokenizer(pairs, name):
    nat, hf = pairs[name]
    assert type(nat.tokenizer) is type(hf.tokenizer)
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id", "padding_side"):
        assert getattr(nat.tokenizer, attr) == getattr(hf.tokenizer, attr), attr
    texts = ["w1 w2 w3 w39", " w5", "w7 w7 w0 w12 w3 w1"]
    assert nat.tokenize(texts) == hf.tokenize(texts)


@pytest.mark.parametrize("name", ["toy-llama", "toy-gpt2", "llama-llama3-rope", "gemma2"])
def test_bfloat16_and_float32_upcasts_agree(folders, name):
    """In bfloat16 and in engine/precision.py's float32 upcasts (whole model, module by module)."""
    from pie_lib.engine.precision import float32_weights
    from pie_lib.models.loading import _contiguous_inputs

    nat = load_model(folders[name], device="cpu", dtype="bfloat16", backend="native")
    hf = load_model(folders[name], device="cpu", dtype="bfloat16", backend="hf")
    assert _contiguous_inputs in nat.hf.get_output_embeddings()._forward_pre_hooks.values()
    hb = dict(hf.hf.named_buffers())
    for n, b in nat.hf.named_buffers():
        assert b.dtype == hb[n].dtype and torch.equal(b, hb[n]), n
    ids = _ids(nat, 3, 11, 5)
    a, b = traces.run_with_cache(nat, ids), traces.run_with_cache(hf, ids)
    assert a.last_logits.dtype == torch.bfloat16 and torch.equal(a.last_logits, b.last_logits)
    off = torch.randn(nat.n_layers, 3, 11, nat.d_model, generator=torch.Generator().manual_seed(0)) * 0.1
    for per_module in (False, True):
        with float32_weights(nat, per_module=per_module), float32_weights(hf, per_module=per_module):
            x, _ = traces.patched_last_logits(nat, ids, off)
            y, _ = traces.patched_last_logits(hf, ids, off)
        assert x.dtype == torch.float32 and torch.equal(x, y), per_module
    assert all(p.dtype == torch.bfloat16 for p in nat.hf.parameters())


def test_wrap_model_takes_a_native_module(pairs):
    from pie_lib.models.loading import wrap_model

    nat, hf = pairs["toy-gpt2"]
    w = wrap_model(nat.hf, nat.tokenizer, name="wrapped")
    assert w.backend == "native" and w.arch.name == "gpt2"
    ids = _ids(nat, 2, 6, 0)
    assert torch.equal(traces.run_with_cache(w, ids).last_logits, traces.run_with_cache(hf, ids).last_logits)


def test_hf_sliding_window_prefix_cache_is_refused(pairs):
    """transformers' cache of a sliding-window layer drops the oldest keys, so an hf Gemma-2 prompt
    longer than the window may not restart from a clean prefix; the native cache keeps every key."""
    nat, hf = pairs["gemma2"]
    window = int(hf.config.sliding_window)
    T = window + 4
    ids = _ids(nat, 2, T, 11)
    # the premise: transformers' cache of a sliding layer holds fewer than T positions
    out = hf.hf(input_ids=ids, use_cache=True)
    cache = out.past_key_values if getattr(out, "past_key_values", None) is not None else out.cache
    assert min(layer.keys.shape[2] for layer in cache.layers) < T
    assert not traces.prefix_cache_keeps_every_key(hf, T) and traces.prefix_cache_keeps_every_key(hf, window)
    assert traces.prefix_cache_keeps_every_key(nat, T)
    with pytest.raises(SettingError, match="sliding window"):
        traces.clean_prefix_cache(hf, ids)
    full = traces.clean_prefix_cache(nat, ids)
    assert all(k.shape[2] == T for k, _ in full.kv)


@pytest.mark.parametrize("name", ["toy-gpt2", "toy-llama"])
def test_padded_short_tail_blocks_round_as_whole_prompts(pairs, name):
    """A native model that pads cached suffixes' 1-3-row tail query blocks starts a suffix at the
    first changed position itself, and the last logits are bitwise the whole prompt's; without the
    padding (transformers' model, the same weights) some of those starts round differently.

    Measured on the toy models, as the unpadded rule's starts are (test_engine_traces_agree): at
    other widths a suffix's smaller matmuls may round differently in either case."""
    from pie_lib.models.native.common import short_block_padding

    nat, hf = pairs[name]
    if not nat.pads_short_query_blocks:
        pytest.skip(f"{name} has grouped queries: its suffixes take another SDPA path than full forwards")
    assert not hf.pads_short_query_blocks
    L, D = nat.n_layers, nat.d_model
    g = torch.Generator().manual_seed(5)
    differs = 0
    for T in (9, 15, 31, 36, 40, 64):
        ids = _ids(nat, 3, T, 100 + T)
        pn, ph = traces.clean_prefix_cache(nat, ids), traces.clean_prefix_cache(hf, ids)
        rows = torch.arange(3)
        for first in range(1, T):
            start = traces.exact_suffix_start(T, first, pads_short_blocks=True, sequences=3)
            assert start == (first if 3 * (T - first) >= 4 else T - 2)
            off = torch.randn(L, 3, T, D, generator=g) * 0.1
            off[:, :, :first] = 0
            want, _ = traces.patched_last_logits(nat, ids, off)
            got, _ = traces.patched_last_logits(nat, ids, off[:, :, start:], prefix=traces.Prefix(pn, rows, start))
            assert torch.equal(got, want), (T, start)
            if short_block_padding(T - start, T):
                unpadded, _ = traces.patched_last_logits(
                    hf, ids, off[:, :, start:], prefix=traces.Prefix(ph, rows, start)
                )
                differs += not torch.equal(unpadded, want)
    assert differs > 0  # the padding is what makes these starts exact


@pytest.mark.parametrize("name", NAMES)
def test_final_block_positions_round_as_the_full_forward(pairs, name):
    """``final_block_positions`` n (the last block's projection, norms and MLP at the last n positions
    only) gives last logits bitwise the full forward's whenever ``exact_final_rows`` allows it:
    batches 1-5, whole prompts and cached suffixes, prompts past Gemma-2's sliding window (16)."""
    from pie_lib.models.native.common import KVCache, exact_final_rows

    model = pairs[name][0].hf
    skipped = 0
    with torch.no_grad():
        for T in (9, 20, 33, 40):
            for B in (1, 2, 3, 5):
                ids = _ids(pairs[name][0], B, T, 11 * T + B)
                clean = KVCache()
                model(input_ids=ids, cache=clean)
                for start in (0, 1, T - 5, T - 2):
                    kw: dict = {}
                    if start:
                        kv = [(e.keys[:, :, :start], e.values[:, :, :start]) for e in clean.layers]
                        kw = dict(cache=KVCache(kv), attention_mask=torch.ones(B, T, dtype=torch.long))
                    n = exact_final_rows(B, T - start)
                    assert n == 0 or (B * n >= 4 and n < T - start)
                    want = model(input_ids=ids[:, start:], logits_to_keep=1, **kw).logits
                    if start:  # the cache grew: rebuild it
                        kw["cache"] = KVCache(kv)
                    out = model(input_ids=ids[:, start:], logits_to_keep=1, final_block_positions=n, **kw)
                    assert torch.equal(out.logits, want), (T, B, start, n)
                    skipped += n > 0
    assert skipped >= 40
    with pytest.raises(ValueError, match="final_block_positions"):
        model(input_ids=ids, final_block_positions=T + 1)


@pytest.mark.parametrize("name", ["toy-gpt2", "toy-llama"])
def test_final_block_needs_four_matmul_rows(pairs, name):
    """Why a batch of 1-3 keeps more than the last position: with fewer than MIN_MATMUL_ROWS rows the
    skipped block's matmuls round differently (measured), so B x n = 1-3 rows is not exact somewhere."""
    model = pairs[name][0].hf
    differs = 0
    with torch.no_grad():
        for T in (9, 20, 40):
            for B in (1, 2, 3):
                ids = _ids(pairs[name][0], B, T, 5 * T + B)
                want = model(input_ids=ids, logits_to_keep=1).logits
                differs += not torch.equal(model(input_ids=ids, logits_to_keep=1, final_block_positions=1).logits, want)
    assert differs > 0


@pytest.mark.parametrize("name", ["toy-gpt2", "toy-llama", "llama-gqa-untied", "gemma2"])
def test_patched_forwards_skip_the_final_block_exactly(pairs, name, monkeypatch):
    """patched_last_logits (whole prompts and clean prefixes) with the final block cut to its last
    positions equals the full forward bit for bit; an offset only at the last layer's last position
    changes the logits (so the offsets' slice is the last positions'), one only at its other
    positions does not."""
    nat, hf = pairs[name]
    L, D = nat.n_layers, nat.d_model
    real_rows = traces._final_rows
    used: list[int] = []

    def spy(model, batch, q_len):
        used.append(real_rows(model, batch, q_len))
        return used[-1]

    T = 20
    ids = _ids(nat, 5, T, 3)
    clean = traces.clean_prefix_cache(nat, ids)
    g = torch.Generator().manual_seed(9)
    for B in (1, 2, 3, 5):
        rows = torch.arange(B)
        off = torch.randn(L, B, T, D, generator=g) * 0.1
        last_only = torch.zeros(L, B, T, D)
        last_only[L - 1, :, -1] = off[L - 1, :, -1]
        early_only = torch.zeros(L, B, T, D)
        early_only[L - 1, :, :-1] = off[L - 1, :, :-1]
        cases = [(off, None), (last_only, None), (early_only, None)]
        for start, layer in ((0, 1), (4, 0), (T - 2, 1), (T - 1, L - 2), (6, L - 1)):
            o = off.clone()
            o[:, :, :start] = 0
            o[:layer] = 0
            cases.append((o, traces.Prefix(clean, rows, start, layer)))
        got = []
        for o, prefix in cases:
            start = prefix.start if prefix else 0
            monkeypatch.setattr(traces, "_final_rows", spy)
            x, _ = traces.patched_last_logits(nat, ids[:B], o[:, :, start:], prefix=prefix)
            monkeypatch.setattr(traces, "_final_rows", lambda *a: 0)
            y, _ = traces.patched_last_logits(nat, ids[:B], o[:, :, start:], prefix=prefix)
            assert torch.equal(x, y), (B, start)
            got.append(x)
        plain, _ = traces.patched_last_logits(nat, ids[:B], torch.zeros(L, B, T, D))
        assert not torch.equal(got[1], plain) and torch.equal(got[2], plain)
    # 7 forwards per batch ask (prefix layer L - 1 runs no block); only those with B x (1-2 positions)
    # left run whole (4 rows would be every position): 2 per batch of 1-3, 1 of 5
    assert len(used) == 4 * 7 and sum(n == 0 for n in used) == 7, used
    assert traces._final_rows(hf, 5, T) == 0  # hf models run whole


@pytest.mark.parametrize("name", NAMES)
def test_preallocated_cache_matches_concatenation(pairs, name):
    """A ``KVCache`` whose layers are preallocated ``[B, H_kv, T, d]`` buffers holding positions
    ``0..start-1`` (``filled=start``), written in place by the suffix forward, gives the concatenating
    cache's logits and keys and values bit for bit; positions past ``start`` start as garbage and are
    all overwritten. Writing past a buffer is refused."""
    from pie_lib.models.native.common import KVCache

    model = pairs[name][0].hf
    with torch.no_grad():
        for T, B in ((9, 1), (20, 3), (33, 5)):
            ids = _ids(pairs[name][0], B, T, 7 * T + B)
            clean = KVCache()
            model(input_ids=ids, cache=clean)
            for start in (1, T - 5, T - 1):
                mask = torch.ones(B, T, dtype=torch.long)
                cat = KVCache([(e.keys[:, :, :start], e.values[:, :, :start]) for e in clean.layers])
                want = model(input_ids=ids[:, start:], cache=cat, attention_mask=mask, logits_to_keep=1).logits
                bufs = []
                for e in clean.layers:
                    k, v = torch.full_like(e.keys, float("nan")), torch.full_like(e.values, float("nan"))
                    k[:, :, :start], v[:, :, :start] = e.keys[:, :, :start], e.values[:, :, :start]
                    bufs.append((k, v))
                pre = KVCache(bufs, filled=start)
                assert pre.get_seq_length() == start
                out = model(input_ids=ids[:, start:], cache=pre, attention_mask=mask, logits_to_keep=1).logits
                assert torch.equal(out, want), (T, B, start)
                for a, b in zip(pre.layers, cat.layers):
                    assert a.filled == T and torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    with pytest.raises(IndexError, match="past its buffer"):
        pre.update(pre.layers[0].keys[:, :, :1], pre.layers[0].values[:, :, :1], 0)
