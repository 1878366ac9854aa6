"""Everything computed once per batch and shared by all methods, budgets and seeds."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pie_lib.clt.transcoder import CrossLayerTranscoder
from pie_lib.engine.traces import GradientMode, mlp_out_gradients, prefix_cache_of
from pie_lib.models.loading import LoadedModel
from pie_lib.prune.config import ScoringConfig  # noqa: F401 (re-exported: its old home)
from pie_lib.prune.occurrences import Occurrences, PairBatch, active_occurrences, run_pair_caches
from pie_lib.prune.patching import PatchEvaluator, can_reuse_prefix, gather_rows
from pie_lib.prune.select import SynergyCache


def pair_forward_keeps_prefix(model: LoadedModel, cfg: ScoringConfig, seq_len: int) -> bool:
    """Whether the patch evaluator's prefix cache is taken from the batch's clean + corrupted forward
    (its clean half) instead of a clean forward of its own.

    Only on a CPU, where torch's matmul rounds each row the same whatever the batch size (from 4 rows,
    ``MIN_MATMUL_ROWS``; every row here is a position), so the clean half holds bitwise the keys,
    values and residuals of the separate forward. A GPU's BLAS may pick its kernels by batch size,
    so there the separate forward is kept and results stay as they were.
    """
    return model.device.type == "cpu" and can_reuse_prefix(model, cfg.metric, seq_len)


@dataclass
class BatchContext:
    """One batch of pairs with its caches, active set, decoder rows and patch evaluator.

    Gradients are computed on first use per mode and cached (FAP and FAP-Synergy share one).
    """

    model: LoadedModel
    clt: CrossLayerTranscoder
    batch: PairBatch
    cfg: ScoringConfig
    occ: Occurrences = field(init=False)
    evaluator: PatchEvaluator = field(init=False)
    #: FAP-Synergy's single / pair effect caches, shared by every K of the batch
    synergy: SynergyCache = field(default_factory=SynergyCache, init=False)
    _grads: dict = field(default_factory=dict, init=False)
    _scores: dict = field(default_factory=dict, init=False)
    _prefix_from_pairs: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        keep_kv = pair_forward_keeps_prefix(self.model, self.cfg, self.batch.seq_len)
        clean, corr = run_pair_caches(self.model, self.batch, self.cfg.corruption, keep_kv=keep_kv)
        self.occ = active_occurrences(self.clt, clean, corr, zero_bos=self.cfg.zero_bos)
        self.rows = gather_rows(self.clt, self.occ, self.cfg.rows_dtype)
        self.evaluator = PatchEvaluator(
            self.model,
            self.clt,
            self.batch,
            self.occ,
            self.rows,
            self.cfg.corruption,
            self.cfg.metric,
            clean.last_logits,
            chunk=self.cfg.chunk,
        )
        self._prefix_from_pairs = self.evaluator.reuse_prefix and clean.kv is not None
        if self._prefix_from_pairs:
            self.evaluator.use_prefix_cache(prefix_cache_of(self.model, clean, copy=True))

    def grads(self, mode: GradientMode) -> torch.Tensor:
        """``[L, B, T, D]`` metric gradient (or RelP relevance) at every MLP output."""
        if mode not in self._grads:
            # the clean MLP outputs, where the prefix cache came from the pair forward (CPU: the same bits)
            given = self.evaluator.prefix_cache().mlp_out if self._prefix_from_pairs and mode == "replacement" else None
            g, _ = mlp_out_gradients(
                self.model, self.batch.clean_ids, self.batch.correct, self.batch.wrong, self.cfg.metric, mode, given
            )
            self._grads[mode] = g
        return self._grads[mode]

    def cached(self, key: str, fn) -> torch.Tensor:
        """Memoise a score vector ``[N]`` under ``key``."""
        if key not in self._scores:
            self._scores[key] = fn()
        return self._scores[key]
