"""Node ids and feature indices of circuit-tracer's graph format (facts of its frontend schema).

- a CLT feature occurrence: node id ``"{layer}_{feature}_{pos}"``; its ``feature`` field (the
  index the frontend uses to fetch the feature page) is the Cantor pairing of (layer, feature);
- an MLP reconstruction error: ``"0_{layer}_{pos}"`` (feature -1);
- a prompt token: ``"E_{vocab}_{pos}"``;
- a logit: ``"{L+1}_{vocab}_{pos}"``.
"""

from __future__ import annotations

import math


def cantor(layer: int, feature: int) -> int:
    """Cantor pairing ``(l + f)(l + f + 1)/2 + f``: one integer per (layer, feature)."""
    s = int(layer) + int(feature)
    return s * (s + 1) // 2 + int(feature)


def cantor_unpair(z: int) -> tuple[int, int]:
    """Inverse of :func:`cantor`: ``z -> (layer, feature)``."""
    if z < 0:
        raise ValueError(f"a Cantor index is a non-negative integer, got {z}")
    w = (math.isqrt(8 * int(z) + 1) - 1) // 2
    feature = int(z) - w * (w + 1) // 2
    return w - feature, feature


def feature_node_id(layer: int, feature: int, pos: int) -> str:
    return f"{layer}_{feature}_{pos}"


def error_node_id(layer: int, pos: int) -> str:
    return f"0_{layer}_{pos}"


def embedding_node_id(vocab: int, pos: int) -> str:
    return f"E_{vocab}_{pos}"


def logit_node_id(n_layers: int, vocab: int, pos: int) -> str:
    return f"{n_layers + 1}_{vocab}_{pos}"
