"""Stage III, Evaluate: FADE-style scores of feature descriptions (spec §8).

- :func:`evaluate` -- ``descriptions.parquet`` -> ``fade_<protocol>.parquet`` (protocol "pie" or "fade").
- :mod:`pie_lib.fade.metrics` -- auroc, gini, average_precision, clarity, responsiveness_purity,
  faithfulness_score (numpy, ties exact).
- :mod:`pie_lib.fade.sampling` -- which natural samples are rated.
- :mod:`pie_lib.fade.steering` -- steering a CLT feature during greedy generation.
"""

from __future__ import annotations

from pie_lib._lazy import lazy_getattr

_LAZY = {
    "evaluate": "pie_lib.fade.protocol",
    "ProtocolConfig": "pie_lib.fade.protocol",
    "FADE_COLUMNS": "pie_lib.fade.protocol",
    "auroc": "pie_lib.fade.metrics",
    "gini": "pie_lib.fade.metrics",
    "average_precision": "pie_lib.fade.metrics",
    "clarity": "pie_lib.fade.metrics",
    "responsiveness_purity": "pie_lib.fade.metrics",
    "faithfulness_score": "pie_lib.fade.metrics",
    "fade_sample": "pie_lib.fade.sampling",
    "pie_sample": "pie_lib.fade.sampling",
    "steered_generate": "pie_lib.fade.steering",
}

__all__ = sorted(_LAZY)

__getattr__ = lazy_getattr("pie_lib.fade", _LAZY)
