"""Memory fixes outside the float32 upcast, each pinned by a test that fails without it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from big_vocab import big_vocab_model, max_allocation

from pie_lib.engine.traces import run_with_cache


@pytest.mark.parametrize("backend", ["hf", "native"])
def test_batch_of_one_unembedding_copies_no_weight(one_torch_thread, tmp_path, backend):
    """A batch of one: the last-position slice ``[1, 1, D]`` of ``[1, T, D]`` counts as contiguous,
    so ``.contiguous()`` kept its strides and the bf16 matmul expanded the whole unembedding (a
    weight-sized copy; 1.1 GiB at Gemma-2-2B). The head's input hook gives it row-major strides:
    no copy, and the logits are bitwise those of the unhooked, trainable model."""
    model = big_vocab_model(tmp_path, backend, tied=False)
    V, D = model.vocab_size, model.d_model
    ids = torch.randint(3, V, (1, 12), generator=torch.Generator().manual_seed(0))
    weight_bytes = 2 * V * D
    run_with_cache(model, ids)
    assert max_allocation(lambda: run_with_cache(model, ids)) < weight_bytes // 4
    frozen = run_with_cache(model, ids).last_logits
    head = model.hf.get_output_embeddings()
    hooks = dict(head._forward_pre_hooks)
    try:
        for p in model.hf.parameters():
            p.requires_grad_(True)
        head._forward_pre_hooks.clear()
        trainable = run_with_cache(model, ids).last_logits
    finally:
        for p in model.hf.parameters():
            p.requires_grad_(False)
        head._forward_pre_hooks.update(hooks)
    assert torch.equal(frozen, trainable)


def test_lazy_decoder_rows_for_the_cpu_are_not_cached_by_default(tmp_path):
    """CPU rows come from the file each time (the OS page cache serves repeats, outside the
    process): the process holds no cache block that grows prompt by prompt. A device, or a
    cache asked for explicitly, still caches."""
    import numpy as np

    from pie_lib.clt.io import save_clt
    from pie_lib.clt.lazy import LazyDecoder, SafetensorsRows

    L, F, D = 2, 20, 8
    g = torch.Generator().manual_seed(0)
    W_dec = [torch.randn(F, L - i, D, generator=g) for i in range(L)]
    save_clt(tmp_path / "c", torch.randn(L, F, D, generator=g), torch.zeros(L, F), W_dec, torch.zeros(L, D), None)
    src = [SafetensorsRows(tmp_path / "c" / f"W_dec_{i}.safetensors", f"W_dec_{i}") for i in range(L)]
    dec = LazyDecoder(src)
    for idx in ([3, 1], [1, 5, 9], list(range(F))):
        assert torch.equal(dec.rows(0, torch.tensor(idx)), W_dec[0][np.array(idx)])
    assert not dec._blocks and not dec._used  # nothing kept
    cached = LazyDecoder(src, cache_bytes=1 << 20)
    assert torch.equal(cached.rows(1, torch.tensor([4, 2])), W_dec[1][[4, 2]])
    assert cached._used[1] == 2


_HEAP_PROBE = r"""
import ctypes, sys, torch
if sys.argv[1] == "pinned":  # what load_model does for a CPU model of LARGE_MODEL_BYTES or more
    from pie_lib.models.host_memory import LARGE_MODEL_BYTES, settle_for_model
    assert settle_for_model(LARGE_MODEL_BYTES, "cpu")
elif sys.argv[1] == "toy":  # a small model leaves glibc's default alone
    from pie_lib.models.loading import load_model
    from pie_lib.toy import toy_model_path
    model = load_model(toy_model_path("gpt2"), device="cpu")
    assert model.extra["mmap_threshold_pinned"] is False
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
big = torch.ones(16 << 18)  # 16 MiB, mapped; freeing it raises glibc's dynamic threshold to 16 MiB
del big
before = libc.mallinfo2().hblkhd
blocks = [torch.ones(1 << 20) for _ in range(10)]  # 10 x 4 MiB
print(libc.mallinfo2().hblkhd - before)
"""


def test_freed_tensors_go_back_to_the_os():
    """Loading a large CPU model pins glibc's mmap threshold: after a 16 MiB tensor was freed,
    4 MiB tensors still get memory maps of their own (returned to the OS when freed). Unpinned,
    freeing the 16 MiB tensor raised the threshold and the 4 MiB tensors came from the heap,
    whose pages stay resident after a free (the creep of a run's resident set). A small model
    (the toy GPT-2) leaves the default alone: mapping every tensor of 1 MiB or more costs a small
    model's run measurable system time."""
    import subprocess
    import sys

    try:
        import ctypes

        ctypes.CDLL(None).mallinfo2  # noqa: B018 - glibc >= 2.33
    except (OSError, AttributeError):
        pytest.skip("needs glibc (mallopt, mallinfo2)")
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    mapped = {}
    for mode in ("pinned", "plain", "toy"):
        out = subprocess.run(
            [sys.executable, "-c", _HEAP_PROBE, mode], capture_output=True, text=True, env=env, timeout=120
        )
        assert out.returncode == 0, out.stderr[-2000:]
        mapped[mode] = int(out.stdout.split()[-1])
    assert mapped["pinned"] >= 40 << 20, mapped  # every 4 MiB tensor mapped on its own
    assert mapped["plain"] < 4 << 20, mapped  # glibc's dynamic threshold: from the heap
    assert mapped["toy"] < 4 << 20, mapped


_LOAD_PROBE = r"""
import sys, torch
from pie_lib.clt import load_clt
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
load_clt(sys.argv[1], lazy=True)  # warm-up: imports, lazy initialisations
open("/proc/self/clear_refs", "w").write("5")
before = status("VmRSS:")
clt = load_clt(sys.argv[1], lazy=True)
print(status("VmHWM:") - before)
"""


def test_clt_encoders_are_read_into_one_tensor(tmp_path):
    """load_clt fills one [L, F, D] encoder tensor layer by layer: the per-layer tensors read from
    the files are not held beside it (stacked at the end, the encoders were held twice: +2 GiB of
    load peak at Llama-3.2-1B's shape). Same values; a layer of another shape is still refused."""
    import subprocess
    import sys

    from pie_lib.clt import load_clt
    from pie_lib.clt.io import save_clt
    from pie_lib.errors import CLTFormatError

    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs /proc/self/clear_refs (Linux) to reset the peak")
    L, F, D = 8, 4096, 256  # 32 MiB of float32 encoders, 4 MiB per layer
    g = torch.Generator().manual_seed(0)
    W_enc = torch.randn(L, F, D, generator=g)
    W_dec = [torch.randn(F, 1, D, generator=g).expand(F, L - i, D).contiguous() for i in range(L)]
    save_clt(tmp_path / "c", W_enc, torch.zeros(L, F), W_dec, torch.zeros(L, D), torch.full((L, F), 0.1))
    assert torch.equal(load_clt(tmp_path / "c").W_enc, W_enc)
    out = subprocess.run(
        [sys.executable, "-c", _LOAD_PROBE, str(tmp_path / "c")], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    growth, enc_bytes = int(out.stdout.split()[-1]), W_enc.numel() * 4
    assert growth < 1.4 * enc_bytes, (growth, enc_bytes)  # one copy plus a layer, not two copies
    from safetensors.torch import load_file, save_file

    path = tmp_path / "c" / "W_enc_1.safetensors"
    t = load_file(str(path))
    t["W_enc_1"] = torch.randn(F, D + 1, generator=g)
    save_file(t, str(path))
    with pytest.raises(CLTFormatError, match="W_enc_1"):
        load_clt(tmp_path / "c")
