"""Stage III, Evaluate: FADE-style scores of feature descriptions (spec §8).

- :func:`evaluate` -- ``descriptions.parquet`` -> ``fade_<protocol>.parquet`` (protocol "pie" or "fade").
- :mod:`pie_lib.evaluate.metrics` -- auroc, gini, average_precision, clarity, responsiveness_purity,
  faithfulness_score (numpy, ties exact).
- :mod:`pie_lib.evaluate.sampling` -- which natural samples are rated.
- :mod:`pie_lib.evaluate.steering` -- steering a CLT feature during greedy generation.
"""

from __future__ import annotations

from pie_lib._lazy import lazy_getattr

_LAZY = {
    "evaluate": "pie_lib.evaluate.protocol",
    "ProtocolConfig": "pie_lib.evaluate.protocol",
    "FADE_COLUMNS": "pie_lib.evaluate.protocol",
    "auroc": "pie_lib.evaluate.metrics",
    "gini": "pie_lib.evaluate.metrics",
    "average_precision": "pie_lib.evaluate.metrics",
    "clarity": "pie_lib.evaluate.metrics",
    "responsiveness_purity": "pie_lib.evaluate.metrics",
    "faithfulness_score": "pie_lib.evaluate.metrics",
    "fade_sample": "pie_lib.evaluate.sampling",
    "pie_sample": "pie_lib.evaluate.sampling",
    "steered_generate": "pie_lib.evaluate.steering",
}

__all__ = sorted(_LAZY)

__getattr__ = lazy_getattr("pie_lib.evaluate", _LAZY)
