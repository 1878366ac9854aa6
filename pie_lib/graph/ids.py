"""Node ids and feature indices of circuit-tracer's graph format (facts of its frontend schema).

- a CLT feature occurrence: node id ``"{layer}_{feature}_{pos}"``; its ``feature`` field (the
  index the frontend uses to fetch the feature page) is the Cantor pairing of (layer, feature);
- an MLP reconstruction error: ``"0_{layer}_{pos}"`` (feature -1);
- a prompt token: ``"E_{vocab}_{pos}"``;
- a logit: ``"{L+1}_{vocab}_{pos}"``.
"""

from __future__ import annotations

from pie_lib.clt.naming import cantor, cantor_unpair

__all__ = ["cantor", "cantor_unpair", "embedding_node_id", "error_node_id", "feature_node_id", "logit_node_id"]


def feature_node_id(layer: int, feature: int, pos: int) -> str:
    return f"{layer}_{feature}_{pos}"


def error_node_id(layer: int, pos: int) -> str:
    return f"0_{layer}_{pos}"


def embedding_node_id(vocab: int, pos: int) -> str:
    return f"E_{vocab}_{pos}"


def logit_node_id(n_layers: int, vocab: int, pos: int) -> str:
    return f"{n_layers + 1}_{vocab}_{pos}"
