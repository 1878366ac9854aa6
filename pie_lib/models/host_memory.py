"""The host allocator setting that keeps a large CPU run's resident set at what it uses.

glibc's ``malloc`` serves a request of at least its *mmap threshold* with a memory map of its
own, returned to the OS when freed, and anything smaller from its heap, whose free pages stay
resident. The threshold is dynamic: freeing a mapped block raises it to that block's size (up
to 32 MiB), so after the first big tensors are freed, tensors of up to 32 MiB come from the heap
and the heap keeps their pages after they are freed. On a CPU run at the paper's shapes that made
the resident set creep with every batch (Gemma-2-2B / 2: +0.2 GiB of peak per prompt over 3
prompts, the phase-start level from 1.20 to 2.41 GiB; at full shape the peak of a run depended on
how many prompts it ran). :func:`pin_mmap_threshold` fixes the threshold at
:data:`MMAP_THRESHOLD_BYTES` (which also turns the dynamic raise off), so every tensor of 1 MiB or
more is returned to the OS when freed.

That costs a page fault per 4 KiB of every new tensor of 1 MiB or more. Against a large model's
matmuls this is not measurable; a small model allocates thousands of such tensors a second, and
there it is not free (the 8-layer x 192 GPT-2 of ``vs_reference.py``: 8.3 -> 10.2 s CPU per run,
1.6 s more system time, measured). So :func:`settle_for_model` pins it only for a CPU model of
at least :data:`LARGE_MODEL_BYTES` of weights; ``load_model`` calls it. Only memory use and
time depend on it, never a number a run computes.

A smaller CPU model goes the other way (:func:`keep_heap`): the threshold fixed at
:data:`HEAP_MMAP_THRESHOLD_BYTES` from the start (not only after the first frees raise it) and
the heap's top trimmed only past :data:`HEAP_TRIM_THRESHOLD_BYTES` of free memory, so the
patch forwards' tensors of up to 32 MiB reuse heap pages instead of faulting new ones in
(random 6 x 256 GPT-2 ``pie prune``, paired runs on a shared machine: system time per run
0.71 -> 0.52, 0.65 -> 0.61 and 0.70 -> 0.55 s, whole-run CPU median ratios 0.955, 1.019 and 0.979
over 6, 6 and 10 pairs, so within the noise; peak +37 MiB).
"""

from __future__ import annotations

import ctypes
import os

#: Host allocations of at least this many bytes get their own memory map (freed to the OS on free).
MMAP_THRESHOLD_BYTES = 1 << 20
#: CPU models with at least this many bytes of weights get the threshold pinned.
LARGE_MODEL_BYTES = 256 << 20
#: A small CPU model's process: blocks under this size come from the heap from the start.
HEAP_MMAP_THRESHOLD_BYTES = 32 << 20  # glibc's own ceiling for its dynamic threshold
#: ... and the heap gives memory back to the OS only past this much free at its top.
HEAP_TRIM_THRESHOLD_BYTES = 128 << 20
_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
_M_MMAP_THRESHOLD = -3
_DEFAULT_TRIM_THRESHOLD = 128 << 10  # glibc's default
_pinned = False  # process-wide: glibc's setting outlives the model that asked for it
_heap = False


def _mallopt(param: int, value: int) -> bool:
    """glibc's ``mallopt``; False where the C library has none (macOS, musl)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(param, int(value)))


def _chosen_by_environment() -> bool:
    """The process was started with its own allocator settings: they are left alone."""
    env = os.environ
    return any(env.get(k) is not None for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")) or (
        "glibc.malloc." in env.get("GLIBC_TUNABLES", "")
    )


def pin_mmap_threshold(nbytes: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Fix glibc's mmap threshold at ``nbytes`` for this process; True when it is set.

    Not set (False): the process already chose one (``MALLOC_MMAP_THRESHOLD_`` in the
    environment), or the C library has no ``mallopt`` (not glibc: macOS, musl).
    """
    global _pinned, _heap
    if _pinned:
        return True
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is not None:
        return False
    _pinned = _mallopt(_M_MMAP_THRESHOLD, nbytes)
    if _pinned and _heap:  # a small model's heap setting came first: its trim threshold goes back too
        _mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
        _heap = False
    return _pinned


def keep_heap() -> bool:
    """Serve blocks under :data:`HEAP_MMAP_THRESHOLD_BYTES` from the heap from now on, and keep up
    to :data:`HEAP_TRIM_THRESHOLD_BYTES` of freed heap memory (a small CPU model's setting); True
    when set. Not set: the threshold is pinned already, the environment chose its own, or the C
    library has no ``mallopt``."""
    global _heap
    if _heap or _pinned:
        return _heap
    if _chosen_by_environment():
        return False
    _heap = _mallopt(_M_MMAP_THRESHOLD, HEAP_MMAP_THRESHOLD_BYTES) and _mallopt(
        _M_TRIM_THRESHOLD, HEAP_TRIM_THRESHOLD_BYTES
    )
    return _heap


def mmap_threshold_pinned() -> bool:
    """Whether this process has pinned the threshold (through :func:`pin_mmap_threshold`)."""
    return _pinned


def settle_for_model(weight_bytes: int, device_type: str) -> bool:
    """Pin the threshold for a large CPU model, keep the heap for a smaller one (see the module
    docstring); True when the threshold is pinned."""
    if device_type == "cpu" and weight_bytes >= LARGE_MODEL_BYTES:
        return pin_mmap_threshold()
    if device_type == "cpu":
        keep_heap()
    return _pinned


__all__ = [
    "HEAP_MMAP_THRESHOLD_BYTES",
    "HEAP_TRIM_THRESHOLD_BYTES",
    "LARGE_MODEL_BYTES",
    "MMAP_THRESHOLD_BYTES",
    "keep_heap",
    "mmap_threshold_pinned",
    "pin_mmap_threshold",
    "settle_for_model",
]
