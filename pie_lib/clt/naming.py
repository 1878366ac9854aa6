"""How a CLT feature is named across layers: the Cantor pairing of (layer, feature).

The public feature stores and circuit-tracer's frontend index a feature of a cross-layer
transcoder by ``cantor(layer, feature) = (l + f)(l + f + 1)/2 + f``.
"""

from __future__ import annotations

import math


def cantor(layer: int, feature: int) -> int:
    """Cantor pairing ``(l + f)(l + f + 1)/2 + f``: one integer per (layer, feature)."""
    if layer < 0 or feature < 0:
        raise ValueError(f"Cantor pairing needs non-negative integers, got ({layer}, {feature})")
    s = int(layer) + int(feature)
    return s * (s + 1) // 2 + int(feature)


def cantor_unpair(z: int) -> tuple[int, int]:
    """Inverse of :func:`cantor`: ``z -> (layer, feature)``."""
    if z < 0:
        raise ValueError(f"a Cantor index is a non-negative integer, got {z}")
    w = (math.isqrt(8 * int(z) + 1) - 1) // 2
    feature = int(z) - w * (w + 1) // 2
    return w - feature, feature
