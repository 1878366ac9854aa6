"""Methods beyond the paper (issue #17): FAP-IG, FAP-iterative, greedy-refine.

Importing this package registers ``fap-ig``, ``fap-iterative`` and ``greedy-refine`` in the
method registry (:mod:`pie_lib.prune.beyond.methods`); their hyper-parameters are read from
``MethodParams.extra`` (:mod:`pie_lib.prune.beyond.config`). The gradients at patched points they
need live in :mod:`pie_lib.engine.attribution`.
"""

from pie_lib.prune.beyond import methods  # noqa: F401  (registers the methods)
from pie_lib.prune.beyond.config import IgConfig, IterativeConfig, RefineConfig
from pie_lib.prune.beyond.ig import fap_ig_scores
from pie_lib.prune.beyond.iterative import iterative_select
from pie_lib.prune.beyond.methods import BEYOND_METHODS
from pie_lib.prune.beyond.refine import RefineTrace, refine_circuits

__all__ = [
    "BEYOND_METHODS",
    "IgConfig",
    "IterativeConfig",
    "RefineConfig",
    "RefineTrace",
    "fap_ig_scores",
    "iterative_select",
    "refine_circuits",
]
