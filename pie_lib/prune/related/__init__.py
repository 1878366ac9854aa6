"""Related circuit-discovery methods on the same CLT occurrence graph (spec §10).

Importing this package registers, in :data:`pie_lib.prune.methods.METHODS`: ``edge-pruning``,
``edge-pruning-shared``, ``hap``, ``ensemble-mean``, ``ensemble-min``, ``ensemble-max`` and
``ensemble-seq`` (:mod:`pie_lib.prune.related.selectors`). Also here: MIB circuit metrics CPR / CMD
(:mod:`pie_lib.prune.related.mib`) and PAHQ-style mixed-precision patching (:mod:`pie_lib.prune.related.pahq`).
Hyper-parameters go in ``MethodParams.extra`` (:mod:`pie_lib.prune.related.config`).
"""

from pie_lib.prune.related import selectors  # noqa: F401  (registers the methods)
from pie_lib.prune.related.config import EnsembleConfig, HapConfig, MaskConfig
from pie_lib.prune.related.masks import clear_mask_timings, learn_masks, mask_timings
from pie_lib.prune.related.mib import cpr_cmd, faithfulness_curve
from pie_lib.prune.related.pahq import pahq_patched_last_logits, reduced_precision
from pie_lib.prune.related.selectors import RELATED_METHODS

__all__ = [
    "EnsembleConfig",
    "HapConfig",
    "MaskConfig",
    "RELATED_METHODS",
    "clear_mask_timings",
    "cpr_cmd",
    "faithfulness_curve",
    "learn_masks",
    "mask_timings",
    "pahq_patched_last_logits",
    "reduced_precision",
]
