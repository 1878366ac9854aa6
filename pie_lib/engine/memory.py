"""How much memory a device has free (the one measure chunk sizing and float32 upcasts budget
from), and the host allocator setting that keeps a long run's resident set at what it uses.

glibc's ``malloc`` serves a request of at least its *mmap threshold* with a memory map of its
own, returned to the OS when freed, and anything smaller from its heap, whose free pages stay
resident. The threshold is dynamic: freeing a mapped block raises it to that block's size (up
to 32 MiB), so after the first big tensors are freed, tensors of up to 32 MiB come from the heap
and the heap keeps their pages after they are freed. On a CPU run that made the resident set
creep with every batch (Gemma-2-2B / 2: +0.2 GiB of peak per prompt over 3 prompts, the
phase-start level from 1.20 to 2.41 GiB; at full shape the peak of a run depended on how many
prompts it ran). :func:`pin_mmap_threshold` fixes the threshold at :data:`MMAP_THRESHOLD_BYTES`
(which also turns the dynamic raise off), so every tensor of 1 MiB or more is returned to the OS
when freed; it runs when this module is imported. Measured: the level and the peak stay flat
from prompt to prompt, at no measurable cost in time (one page fault per 4 KiB of a new tensor,
against the matmuls that fill it).
"""

from __future__ import annotations

import ctypes
import os

import torch

#: Host allocations of at least this many bytes get their own memory map (freed to the OS on free).
MMAP_THRESHOLD_BYTES = 1 << 20
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)


def pin_mmap_threshold(nbytes: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Fix glibc's mmap threshold at ``nbytes`` for this process; True when it was set.

    Not set (False): the process already chose one (``MALLOC_MMAP_THRESHOLD_`` in the
    environment), or the C library has no ``mallopt`` (not glibc: macOS, musl). Only memory use
    depends on it, never a number a run computes.
    """
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is not None:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, int(nbytes)))


MMAP_THRESHOLD_PINNED = pin_mmap_threshold()


def available_memory_bytes(device: torch.device) -> int:
    """Free memory on ``device``: CUDA's free bytes, else the host's MemAvailable (Linux) or 4 GiB."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


__all__ = ["MMAP_THRESHOLD_BYTES", "MMAP_THRESHOLD_PINNED", "available_memory_bytes", "pin_mmap_threshold"]
