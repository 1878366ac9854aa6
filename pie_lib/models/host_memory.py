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
"""

from __future__ import annotations

import ctypes
import os

#: Host allocations of at least this many bytes get their own memory map (freed to the OS on free).
MMAP_THRESHOLD_BYTES = 1 << 20
#: CPU models with at least this many bytes of weights get the threshold pinned.
LARGE_MODEL_BYTES = 256 << 20
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)
_pinned = False  # process-wide: glibc's setting outlives the model that asked for it


def pin_mmap_threshold(nbytes: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Fix glibc's mmap threshold at ``nbytes`` for this process; True when it is set.

    Not set (False): the process already chose one (``MALLOC_MMAP_THRESHOLD_`` in the
    environment), or the C library has no ``mallopt`` (not glibc: macOS, musl).
    """
    global _pinned
    if _pinned:
        return True
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is not None:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    _pinned = bool(mallopt(_M_MMAP_THRESHOLD, int(nbytes)))
    return _pinned


def mmap_threshold_pinned() -> bool:
    """Whether this process has pinned the threshold (through :func:`pin_mmap_threshold`)."""
    return _pinned


def settle_for_model(weight_bytes: int, device_type: str) -> bool:
    """Pin the threshold for a large CPU model (see the module docstring); True when it is pinned."""
    if device_type == "cpu" and weight_bytes >= LARGE_MODEL_BYTES:
        return pin_mmap_threshold()
    return _pinned


__all__ = [
    "LARGE_MODEL_BYTES",
    "MMAP_THRESHOLD_BYTES",
    "mmap_threshold_pinned",
    "pin_mmap_threshold",
    "settle_for_model",
]
