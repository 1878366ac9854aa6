"""pie_lib: Prune, Interpret, Evaluate -- budgeted circuit discovery on CLT features.

The public surface is small and imported lazily so ``import pie_lib`` stays fast:

- :func:`load_model` -- a Hugging Face causal LM wrapped in nnsight plus its architecture spec.
- :func:`load_clt` -- a cross-layer transcoder (circuit-tracer format) with lazy decoders.
- :mod:`pie_lib.prune` -- FAP, FAP-Synergy, baselines, evaluation and sweeps.
"""

from __future__ import annotations

from pie_lib._lazy import lazy_getattr

__version__ = "0.1.0"

_LAZY = {
    "load_model": "pie_lib.models.loading",
    "LoadedModel": "pie_lib.models.loading",
    "load_clt": "pie_lib.clt.io",
    "save_clt": "pie_lib.clt.io",
    "CrossLayerTranscoder": "pie_lib.clt.transcoder",
    "Pair": "pie_lib.data.pairs",
    "load_pairs": "pie_lib.data.pairs",
    "save_pairs": "pie_lib.data.pairs",
}

__all__ = sorted(_LAZY) + ["__version__"]

__getattr__ = lazy_getattr("pie_lib", _LAZY)
