"""How much memory a device has free: the one measure chunk sizing and float32 upcasts budget from.

(The host allocator setting that keeps a large CPU run's resident set flat is
:mod:`pie_lib.models.host_memory`, applied by ``load_model``.)
"""

from __future__ import annotations

import torch


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


__all__ = ["available_memory_bytes"]
