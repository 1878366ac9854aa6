"""Removing occurrences in the real model, many variants per forward (spec §3, §4).

Removing occurrence (l, t, i) subtracts its delta writes ``Δa · W_dec[l][i, s-l]`` from the MLP
output of every target layer s at position t; downstream everything is recomputed. A *variant*
is one set of removed occurrences of one prompt. Variants of every prompt of a batch are stacked
along the batch axis and run together, ``chunk`` at a time.

For circuits it is cheaper to list the *kept* occurrences: removed = all active − kept, so the
offsets are ``null − kept`` where ``null`` (everything removed) is computed once per prompt.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from pie_lib.clt.transcoder import CrossLayerTranscoder
from pie_lib.engine.masked import last_token_kl
from pie_lib.engine.memory import available_memory_bytes
from pie_lib.engine.remote import is_remote
from pie_lib.engine.rules import subtract_rows
from pie_lib.engine.traces import (
    MetricKind,
    PatchedStates,
    Prefix,
    PrefixCache,
    SparseOffsets,
    clean_prefix_cache,
    exact_suffix_start,
    metric_value,
    parameter_precision,
    patched_last_logits,
    patched_last_logits_many,
    patched_suffix_with_states,
    prefix_cache_keeps_every_key,
)
from pie_lib.errors import SettingError
from pie_lib.models.host_memory import mmap_threshold_pinned
from pie_lib.models.loading import LoadedModel
from pie_lib.models.native.common import MIN_MATMUL_ROWS
from pie_lib.prune.occurrences import Corruption, Occurrences, PairBatch

log = logging.getLogger(__name__)


def is_out_of_memory(exc: BaseException) -> bool:
    """A CUDA OOM, or a CPU allocator failure (torch raises both as RuntimeError)."""
    if isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    msg = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in msg or "can't allocate memory" in msg)


#: On a CPU, forwards of more tokens than this are not faster per token (measured on the toy world:
#: 64 x 15 and 256 x 15 tokens per forward ran at the same speed, 1024 x 15 1.5x slower per token).
CPU_TOKENS_PER_FORWARD = 4096


def auto_chunk(
    model: LoadedModel, seq_len: int, fraction: float = 0.25, max_variants: int = 4096, run_len: int | None = None
) -> int:
    """Patch variants per forward from the free memory and the sequence length.

    A variant costs (float32 offsets, bytes): its ``[L, T, D]`` offsets, the clean keys and values
    it starts from (at most ``2 L T D``), the transient activations of one layer over the ``R``
    positions it runs (~``R * (4 D + 2 d_mlp)`` values plus ``heads * R * T`` attention scores) and
    one row of last-position logits. ``fraction`` of the free memory is spent; on a CPU the chunk
    is also capped at :data:`CPU_TOKENS_PER_FORWARD` tokens run.

    Args:
        seq_len: T; run_len: R, the positions each forward runs (default T; fewer when the forward
            starts from a clean prefix).
    """
    cfg = model.config
    L, D = model.n_layers, model.d_model
    d_mlp = int(getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or 4 * D)
    heads = int(getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", None) or 1)
    T = max(1, int(seq_len))
    R = T if run_len is None else max(1, min(int(run_len), T))
    kv = 0 if R == T else 4 * 2 * L * T * D
    per_variant = 4 * (L * T * D) + kv + 4 * R * (4 * D + 2 * d_mlp) + 4 * heads * R * T + 4 * model.vocab_size
    dev = model.device
    n = int(fraction * available_memory_bytes(dev)) // max(per_variant, 1)
    if dev.type != "cuda":
        n = min(n, CPU_TOKENS_PER_FORWARD // R)
    return max(1, min(n, max_variants))


#: What one more forward costs, in positions run (nnsight's trace plus the per-module calls of a
#: forward, against the compute of one position of the variants it holds): ~2 ms against ~35 us
#: per position on one CPU thread (toy GPT-2); GPU forwards are far cheaper per position. Only used
#: to decide which prefix groups share a forward; outcomes do not depend on it.
TRACE_COST_POSITIONS = {"cpu": 64, "cuda": 16384}


@dataclass
class LayerRows:
    """Decoder rows of the features one batch uses at one source layer.

    Attributes:
        feats: ``[U]`` sorted unique feature ids; rows: ``[U, n_out, D]``; occ_u: ``[N_l]`` row of
        each occurrence of this layer; occ_idx: ``[N_l]`` those occurrences' indices in the batch.
    """

    feats: Int[Tensor, " U"]
    rows: Float[Tensor, "U n_out D"]
    occ_u: Int[Tensor, " N_l"]
    occ_idx: Int[Tensor, " N_l"]


@dataclass
class _LayerWrites:
    """The delta writes of one source layer's entries (:meth:`PatchEvaluator._layer_writes`).

    Attributes:
        layer: the source layer; var, pos: ``[E]`` each entry's variant and position (from the
        forward's start); u: ``[E]`` its row in ``rows.rows``; coef: ``[E]`` its Δa (times weight);
        dense: whether the layer sums its writes by one matmul instead of scattering them.
    """

    layer: int
    var: Int[Tensor, " E"]
    pos: Int[Tensor, " E"]
    u: Int[Tensor, " E"]
    coef: Float[Tensor, " E"]
    rows: LayerRows
    dense: bool


def layer_entries(
    rows: list[LayerRows | None], occ_layer: torch.Tensor, occ_idx: torch.Tensor
) -> list[tuple[int, torch.Tensor, torch.Tensor, LayerRows]]:
    """Which decoder rows a list of occurrences writes with, layer by layer.

    Args:
        rows: the batch's :class:`LayerRows` per source layer (None: no active feature there).
        occ_layer: ``[N]`` source layer of every batch occurrence; occ_idx: ``[E]`` entries
            (batch occurrence indices, any order, repeats allowed), on ``occ_layer``'s device.
    Returns:
        ``(layer, sel, u, lr)`` for every layer with entries: ``sel`` the positions in ``occ_idx``
        of that layer's entries (on ``occ_idx``'s device), ``u`` their rows in ``lr.rows``.
    """
    layer_of = occ_layer[occ_idx]
    out = []
    for layer, lr in enumerate(rows):
        if lr is None:
            continue
        sel = (layer_of == layer).nonzero().squeeze(-1)
        if sel.numel() == 0:
            continue
        # position of each selected occurrence inside this layer's list -> its decoder row
        local = torch.searchsorted(lr.occ_idx, occ_idx[sel].to(lr.occ_idx.device))
        out.append((layer, sel, lr.occ_u[local.to(lr.occ_u.device)], lr))
    return out


def gather_rows(
    clt: CrossLayerTranscoder, occ: Occurrences, dtype: torch.dtype = torch.float32
) -> list[LayerRows | None]:
    """Fetch, once per batch, the decoder rows of every feature with an active occurrence."""
    out: list[LayerRows | None] = []
    for layer in range(clt.n_layers):
        occ_idx = (occ.layer == layer).nonzero().squeeze(-1)
        if occ_idx.numel() == 0:
            out.append(None)
            continue
        feats, occ_u = torch.unique(occ.feat[occ_idx], return_inverse=True)
        rows = clt.decoder_rows(layer, feats).to(dtype)
        out.append(LayerRows(feats, rows, occ_u.to(rows.device), occ_idx))
    return out


@dataclass
class Variants:
    """V removal variants (COO). Variant v acts on batch row ``prompt[v]``; entry e puts
    occurrence ``occ[e]`` into variant ``var[e]`` with weight ``weight[e]`` (1 = fully removed).
    ``complement[v]`` flips the meaning: the listed occurrences are *kept*, all others removed.

    ``parent[v]`` (optional; -1: none) names a state kept by an earlier :meth:`PatchEvaluator.run`
    (``retain``): variant v may start where its removals first differ from that state's and take the
    positions before from its keys and values. A parent changes no outcome, only the work.
    """

    prompt: torch.Tensor
    var: torch.Tensor
    occ: torch.Tensor
    complement: torch.Tensor
    weight: torch.Tensor | None = None
    parent: torch.Tensor | None = None

    @property
    def n(self) -> int:
        return self.prompt.numel()

    @staticmethod
    def concat(parts: list["Variants"]) -> "Variants":
        shift, vs = 0, []
        for p in parts:
            vs.append(p.var + shift)
            shift += p.n
        w = None
        if any(p.weight is not None for p in parts):
            w = torch.cat([p.weight if p.weight is not None else torch.ones(p.occ.numel()) for p in parts])
        par = None
        if any(p.parent is not None for p in parts):
            par = torch.cat([p.parent if p.parent is not None else torch.full((p.n,), -1) for p in parts])
        return Variants(
            prompt=torch.cat([p.prompt for p in parts]),
            var=torch.cat(vs),
            occ=torch.cat([p.occ for p in parts]),
            complement=torch.cat([p.complement for p in parts]),
            weight=w,
            parent=par,
        )

    def take(self, idx: torch.Tensor) -> "Variants":
        """Variants ``idx`` ``[V']`` (distinct), renumbered ``0..V'-1`` in that order."""
        new_id = torch.full((self.n,), -1, dtype=torch.long)
        new_id[idx] = torch.arange(idx.numel())
        ent = new_id[self.var] >= 0
        return Variants(
            prompt=self.prompt[idx],
            var=new_id[self.var[ent]],
            occ=self.occ[ent],
            complement=self.complement[idx],
            weight=self.weight[ent] if self.weight is not None else None,
            parent=self.parent[idx] if self.parent is not None else None,
        )

    @staticmethod
    def singles(prompt: torch.Tensor, occ: torch.Tensor) -> "Variants":
        """One variant per occurrence ``occ[v]`` (removed alone) of prompt ``prompt[v]``."""
        v = torch.arange(occ.numel())
        return Variants(prompt, v, occ, torch.zeros(occ.numel(), dtype=torch.bool))

    @staticmethod
    def from_sets(prompt: torch.Tensor, members: torch.Tensor, complement: bool) -> "Variants":
        """Variants from a membership mask ``members`` ``[V, N]`` (bool over batch occurrences)."""
        var, occ = members.nonzero(as_tuple=True)
        return Variants(prompt, var, occ, torch.full((prompt.numel(),), complement, dtype=torch.bool))


@dataclass
class PatchResult:
    """Per-variant outcomes: metric ``[V]``, KL(clean || patched) ``[V]``, argmax changed ``[V]``;
    ``state`` ``[V]``: the id of each variant's kept state (``run(..., retain=...)``; -1: none kept)."""

    metric: torch.Tensor
    kl: torch.Tensor
    pred_change: torch.Tensor
    state: torch.Tensor | None = None


@dataclass
class _StateTable:
    """One :meth:`PatchEvaluator.run` call's kept states, written in place by its forwards: ``states``
    has room for ``capacity`` sequences (sized once from the state budget), of which the first
    ``used`` rows hold those of variants ``variants`` (per forward, in order)."""

    states: PatchedStates
    used: int = 0
    variants: list[torch.Tensor] = field(default_factory=list)

    @property
    def capacity(self) -> int:
        return self.states.n


def can_reuse_prefix(model: LoadedModel, metric: MetricKind, seq_len: int) -> bool:
    """Whether patched forwards of ``seq_len``-token prompts can start from the clean runs' keys and
    values: a local model (a remote forward runs whole prompts), the logit_diff metric (logsumexp
    sums every position) and a cache that keeps every key."""
    return not is_remote(model) and metric == "logit_diff" and prefix_cache_keeps_every_key(model, seq_len)


class PatchEvaluator:
    """Runs removal variants of one batch in the real model.

    Args:
        model, clt: the model and its CLT.
        batch: the pairs; occ: their active occurrences; rows: :func:`gather_rows` output.
        corruption: "corrupted" (Δa = a_clean - a_corr) or "zero" (Δa = a_clean).
        metric: the behaviour metric m.
        clean_logits: ``[B, V]`` last-token logits of the clean runs.
        chunk: variants per forward; None = :func:`auto_chunk` (free memory and sequence length).
            A forward that runs out of memory is retried with half as many variants (down to 1),
            and the smaller chunk is kept for the rest of the batch.
        request_bytes: remote only: the offsets one request (session) may carry; the chunks of
            one :meth:`run` go as ``ceil(offset bytes / request_bytes)`` requests.
        reuse_prefix: start each local forward at the first position its variants change, from
            the clean run's keys and values (:class:`~pie_lib.engine.traces.PrefixCache`): a
            removal at position t leaves every position before t as in the clean run. None = on
            wherever it applies: a local model and the logit_diff metric (logsumexp sums every
            position; remote forwards keep whole prompts, one request per batch of chunks).

    Identical variants (same prompt, same removed set and weights, same complement flag) run
    once per :meth:`run` call -- e.g. FAP and FAP-Synergy circuits that coincide at a budget.

    With prefix reuse the variants of a :meth:`run` are grouped by the first position they
    change (:meth:`_prefix_groups`); each forward runs positions ``start..T-1`` only, ``start``
    moved earlier where needed so the forward rounds as a whole-prompt forward does
    (:func:`~pie_lib.engine.traces.exact_suffix_start`). Outcomes equal the whole-prompt path's
    (``tests/test_patch_batching.py``).
    """

    def __init__(
        self,
        model: LoadedModel,
        clt: CrossLayerTranscoder,
        batch: PairBatch,
        occ: Occurrences,
        rows: list[LayerRows | None],
        corruption: Corruption,
        metric: MetricKind,
        clean_logits: torch.Tensor,
        chunk: int | None = None,
        request_bytes: int = 256 << 20,
        reuse_prefix: bool | None = None,
    ) -> None:
        self.model, self.clt, self.batch, self.occ, self.rows = model, clt, batch, occ, rows
        self.metric = metric
        self.delta = occ.delta(corruption)
        self.clean_logits = clean_logits.float()
        self.auto_chunk = chunk is None  # sized per forward length, until a chunk is set
        if chunk is None:
            chunk = auto_chunk(model, batch.seq_len)
        if chunk < 1:
            raise SettingError(f"chunk {chunk}: patch variants per forward must be a positive integer")
        self._chunk = chunk
        self.request_bytes = request_bytes
        can_reuse = can_reuse_prefix(model, metric, batch.seq_len)
        if reuse_prefix and not can_reuse:
            raise SettingError(
                "reuse_prefix needs a local model, the logit_diff metric and a cache that keeps every key (a remote "
                "forward runs whole prompts; logsumexp sums every position; transformers' sliding-window cache "
                "drops keys of prompts longer than the window)"
            )
        self.reuse_prefix = can_reuse if reuse_prefix is None else reuse_prefix
        self._prefix: dict[tuple, PrefixCache] = {}  # clean keys / values, per parameter precision
        self._chunks: dict[int, int] = {}  # automatic variants per forward, per positions run
        self._null: torch.Tensor | None = None
        self._bounds: tuple[torch.Tensor, torch.Tensor] | None = None  # per prompt: first active position, lowest layer
        # kept states of earlier forwards (run(..., retain=...)) and the removal sets they hold
        self.states: PatchedStates | None = None
        self._state_sets: Variants | None = None
        # of the free memory that kept states may take; none where this process pins glibc's mmap
        # threshold (CPU models of >= 256 MiB, models/host_memory.py): at Gemma-2-2B's full shape
        # kept states raised the 4-prompt peak by 0.58 GiB (the resident set crept from prompt to
        # prompt: 8.83 against 8.26 GiB, and 8.19 GiB over 2 prompts), so the peak came to depend on --n
        self.state_fraction = 0.0 if mmap_threshold_pinned() else 0.1
        self.n_forwards = 0  # patch traces run
        self.n_sequences = 0  # patched sequences (variants) they held, after de-duplication
        self.n_positions = 0  # positions those sequences ran (fewer than n_sequences * T with prefix reuse)
        self.n_layer_positions = 0  # (position, decoder layer)s run: layers below the first patched one are skipped
        dev = self.clean_logits.device
        self.m_clean = (
            metric_value(self.clean_logits, batch.correct.to(dev), batch.wrong.to(dev), "logit_diff")
            if metric == "logit_diff"
            else None
        )

    @property
    def chunk(self) -> int:
        """Variants per whole-prompt forward (shorter forwards from a clean prefix hold more of them
        while the chunk is automatic)."""
        return self._chunk

    @chunk.setter
    def chunk(self, n: int) -> None:  # a chunk set by hand (or by an out-of-memory retry) holds for every forward
        self._chunk = n
        self.auto_chunk = False

    # -------------------------------------------------------------- offsets
    def offsets(
        self, var: torch.Tensor, occ_idx: torch.Tensor, weight: torch.Tensor | None, n_var: int, start: int = 0
    ) -> torch.Tensor:
        """Summed delta writes ``[L, n_var, T - start, D]`` of entries (variant ``var[e]``, occurrence
        ``occ_idx[e]``) at positions ``start..T-1``; no entry may sit before ``start``."""
        L, T = self.clt.n_layers, self.batch.seq_len
        D = self.clt.d_model
        P = T - start
        out = torch.zeros(L, n_var, P, D, device=self.model.device, dtype=torch.float32)
        for w in self._layer_writes(var, occ_idx, weight, n_var, start):
            n_out = w.rows.rows.shape[1]
            if w.dense:  # many entries per (variant, position) -- one matmul over the layer's features
                C = torch.zeros(n_var, P, w.rows.feats.numel(), device=w.rows.rows.device, dtype=w.rows.rows.dtype)
                C.index_put_((w.var, w.pos, w.u), w.coef, accumulate=True)
                out[w.layer : w.layer + n_out] += torch.einsum("vtu,usd->svtd", C, w.rows.rows).to(out.dtype)
            else:
                dest = self._write_rows(w, n_var, P).to(out.device)
                self._scatter_writes(out.view(-1, D), dest, w.u, w.coef, w.rows.rows)
        return out

    def sparse_offsets(
        self, var: torch.Tensor, occ_idx: torch.Tensor, weight: torch.Tensor | None, n_var: int, start: int = 0
    ) -> SparseOffsets | None:
        """:meth:`offsets` as :class:`~pie_lib.engine.traces.SparseOffsets`: only the rows some entry
        writes, each summed from the same writes in the same order as there (the same bits); None where
        a layer takes the dense matmul path (:meth:`_layer_writes`)."""
        L, D = self.clt.n_layers, self.clt.d_model
        P = self.batch.seq_len - start
        writes = self._layer_writes(var, occ_idx, weight, n_var, start)
        if any(w.dense for w in writes):
            return None
        dev = self.model.device
        dests = [self._write_rows(w, n_var, P).to(dev) for w in writes]  # rows of the dense [L * n_var * P, D]
        flat = torch.cat([d.flatten() for d in dests]) if dests else torch.zeros(0, dtype=torch.long, device=dev)
        uniq, compact = torch.unique(flat, return_inverse=True)  # sorted: by layer, then variant, then position
        acc = torch.zeros(uniq.numel(), D, device=dev, dtype=torch.float32)
        at = 0
        for w, d in zip(writes, dests):
            self._scatter_writes(acc, compact[at : at + d.numel()].view(d.shape), w.u, w.coef, w.rows.rows)
            at += d.numel()
        per_layer = n_var * P
        bounds = torch.searchsorted(uniq, torch.arange(L + 1, device=dev) * per_layer).tolist()
        idx = [uniq[bounds[j] : bounds[j + 1]] - j * per_layer for j in range(L)]
        rows = [acc[bounds[j] : bounds[j + 1]] for j in range(L)]
        return SparseOffsets(idx, rows, n_var, P, D)

    def _layer_writes(
        self, var: torch.Tensor, occ_idx: torch.Tensor, weight: torch.Tensor | None, n_var: int, start: int
    ) -> list[_LayerWrites]:
        """The entries' delta writes grouped by source layer (in layer order), positions counted from ``start``.

        A layer whose entries are many per (variant, position) -- ``8 E >= n_var T U`` -- is marked
        ``dense`` (one matmul over its features); the path is chosen on the whole prompt, so a suffix
        sums its entries as the whole prompt does.
        """
        T = self.batch.seq_len
        coef = self.delta[occ_idx]
        if weight is not None:
            coef = coef * weight.to(coef)
        out = []
        for layer, sel, u, lr in layer_entries(self.rows, self.occ.layer, occ_idx):
            dev = lr.rows.device
            t_e = self.occ.pos[occ_idx[sel]].to(dev) - start
            if start and bool((t_e < 0).any()):
                raise ValueError(f"offsets from position {start}: an entry sits before it")
            dense = sel.numel() * 8 >= n_var * T * lr.feats.numel()
            out.append(_LayerWrites(layer, var[sel].to(dev), t_e, u, coef[sel].to(dev, lr.rows.dtype), lr, dense))
        return out

    @staticmethod
    def _write_rows(w: _LayerWrites, n_var: int, n_pos: int) -> torch.Tensor:
        """``[E, n_out]`` the row of the dense ``[L * n_var * n_pos, D]`` offsets each entry's writes go to."""
        s = torch.arange(w.rows.rows.shape[1], device=w.var.device)
        return ((w.layer + s[None, :]) * n_var + w.var[:, None]) * n_pos + w.pos[:, None]

    @staticmethod
    def _scatter_writes(
        out: torch.Tensor,
        dest: torch.Tensor,
        u: torch.Tensor,
        coef: torch.Tensor,
        rows: torch.Tensor,
        max_values: int = 1 << 18,
    ) -> None:
        """Sparse path: add ``coef_e · rows[u_e, s]`` to row ``dest[e, s]`` of ``out`` ``[N, D]`` for every entry e.

        Few entries per variant (single or pair removals, kept sets of small K): gathering their rows
        costs E·n_out·D instead of the dense path's V·T·U·n_out·D. Entries go in chunks so the
        gathered rows stay under ``max_values`` values: 2^18 (1 MiB) stays in cache, and a null set
        of 76k entries took 0.03 s against 0.15-0.17 s in chunks of 2^24 (toy GPT-2, one thread).
        The entries are added in the same order whatever the chunk and whatever ``out`` is (the
        dense offsets, or the compact rows of :meth:`sparse_offsets`), so the sums are bit-identical.
        """
        D = out.shape[-1]
        n_out = rows.shape[1]
        step = max(1, max_values // (n_out * D))
        for lo in range(0, u.numel(), step):
            hi = lo + step
            w = rows[u[lo:hi]] * coef[lo:hi, None, None]  # [E, n_out, D]
            out.index_add_(0, dest[lo:hi].flatten().to(out.device), w.reshape(-1, D).to(out.dtype))

    def null_offsets(self) -> torch.Tensor:
        """``[L, B, T, D]``: every active occurrence of each prompt removed."""
        if self._null is None:
            self._null = self.offsets(self.occ.prompt, torch.arange(len(self.occ)), None, self.batch.size)
        return self._null

    # -------------------------------------------------------------- forwards
    def run(
        self,
        variants: Variants,
        extra_offsets: torch.Tensor | None = None,
        retain: bool | torch.Tensor = False,
    ) -> PatchResult:
        """Evaluate every variant; forwards are batched ``chunk`` variants at a time.

        Args:
            variants: what each variant removes (and, optionally, the kept state each may start from:
                ``variants.parent``).
            extra_offsets: optional ``[L, B, T, D]`` added to every variant of prompt b (a shared
                base state, e.g. ACDC's current removals), by linearity of the offsets.
            retain: keep the keys and values of these variants' forwards (``[V]`` bool, or all), for
                later variants that agree with one of them up to some position (:class:`Variants`
                ``parent``). Kept only with prefix reuse, without ``extra_offsets``, and while they fit
                in :attr:`state_fraction` of the free memory; ``result.state`` says which were kept.
                :meth:`release_states` frees them.
        Returns:
            Host tensors. Locally, every chunk's results stay on the device until all chunks ran
            (one host copy per call, not one per chunk).
        """
        keep = self._retain_mask(variants, retain, extra_offsets)
        uniq, inverse = _unique_variants(variants)
        if uniq is not None:
            assert inverse is not None
            keep_u = None
            if keep is not None:
                keep_u = torch.zeros(uniq.n, dtype=torch.bool).index_put_((inverse,), keep, accumulate=True)
            res = self._run_all(uniq, extra_offsets, keep_u)
            state = res.state[inverse] if res.state is not None else None
            return PatchResult(res.metric[inverse], res.kl[inverse], res.pred_change[inverse], state)
        return self._run_all(variants, extra_offsets, keep)

    def release_states(self) -> None:
        """Drop every kept state (their ids are invalid afterwards)."""
        self.states, self._state_sets = None, None

    def _retain_mask(
        self, variants: Variants, retain: bool | torch.Tensor, extra_offsets: torch.Tensor | None
    ) -> torch.Tensor | None:
        """``[V]`` which variants' states to keep, or None (none)."""
        if isinstance(retain, bool):
            if not retain:
                return None
            mask = torch.ones(variants.n, dtype=torch.bool)
        else:
            mask = retain.to(torch.bool).cpu()
            if mask.shape != (variants.n,):
                raise ValueError(f"retain mask of shape {tuple(mask.shape)}; expected ({variants.n},)")
        if not self.reuse_prefix or extra_offsets is not None or self.state_fraction <= 0 or not bool(mask.any()):
            return None  # states exist only for forwards from the clean prefix, and only with room for them
        return mask

    def _run_all(
        self, variants: Variants, extra_offsets: torch.Tensor | None, keep: torch.Tensor | None = None
    ) -> PatchResult:
        V = variants.n
        order = torch.argsort(variants.var, stable=True)
        var_sorted = variants.var[order]
        if is_remote(self.model):
            metric = torch.empty(V)
            kl = torch.empty(V)
            change = torch.empty(V, dtype=torch.bool)
            self._run_remote(variants, order, var_sorted, extra_offsets, metric, kl, change)
            return PatchResult(metric, kl, change)
        perm: torch.Tensor | None = None
        groups = [(0, V, 0, 0)]  # (first variant, end, start position, first layer): the whole prompt
        parent = torch.full((V,), -1, dtype=torch.long)
        if self.reuse_prefix and V:
            first, layer, parent = self._first_changed(variants, extra_offsets)
            T = self.batch.seq_len
            perm = torch.argsort(layer * (T + 1) + first, stable=True)  # by (layer, position)
            variants, first, layer, parent = variants.take(perm), first[perm], layer[perm], parent[perm]
            keep = keep[perm] if keep is not None else None
            order = torch.argsort(variants.var, stable=True)
            var_sorted = variants.var[order]
            groups = self._prefix_groups(first, layer)
        parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        table = self._state_table(int(keep.sum())) if keep is not None else None
        for lo, hi, first_pos, first_layer in groups:
            start = lo
            while start < hi:
                stop = min(hi, start + self._chunk_for(self.batch.seq_len - first_pos))
                try:
                    res = self._run_range(
                        variants, order, var_sorted, start, stop, extra_offsets, first_pos, first_layer,
                        parent, keep, table,
                    )  # fmt: skip
                except Exception as exc:
                    if not is_out_of_memory(exc):
                        raise
                    if stop - start <= 1:
                        raise SettingError(
                            f"out of memory evaluating a single patch variant on {self.model.device} "
                            f"({type(exc).__name__}); use --batch-size 1, --dtype bfloat16, a larger device, or --remote"
                        ) from None
                    res = None
                if res is None:  # out of memory: halve the chunk (kept for the rest) and retry from here
                    self.chunk = max(1, self._chunk_for(self.batch.seq_len - first_pos) // 2)
                    log.warning(
                        "out of memory with %d patch variants per forward; retrying with %d", stop - start, self.chunk
                    )
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
                    continue
                parts.append(res)
                start = stop
        if not parts:
            return PatchResult(torch.empty(0), torch.empty(0), torch.empty(0, dtype=torch.bool))
        metric, kl, change = (torch.cat([p[i] for p in parts]).cpu() for i in range(3))
        state = self._store_states(variants, table) if keep is not None else None
        if perm is not None:  # back to the caller's order
            back = torch.empty_like(perm)
            back[perm] = torch.arange(perm.numel())
            metric, kl, change = metric[back], kl[back], change[back]
            state = state[back] if state is not None else None
        return PatchResult(metric.float(), kl.float(), change.bool(), state)

    def _state_budget(self) -> int:
        """Bytes kept states may still take: :attr:`state_fraction` of the free memory, less those kept."""
        held = 0
        if self.states is not None:
            held = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self.states.kv)
        return max(0, int(self.state_fraction * available_memory_bytes(self.model.device)) - held)

    def _state_table(self, wanted: int) -> _StateTable | None:
        """Room for the states of ``wanted`` sequences, or of as many as the state budget holds (None: none).

        One ``[n, H_kv, T, d]`` buffer per layer and kind, in the clean cache's dtype and layout, so
        each forward writes its kept sequences straight into it (no per-forward copies to concatenate)."""
        cache = self.prefix_cache()
        per_seq = sum(k[0].numel() * k.element_size() + v[0].numel() * v.element_size() for k, v in cache.kv)
        n = min(wanted, self._state_budget() // max(per_seq, 1))
        if n <= 0:
            return None
        kv = [(k.new_empty((n, *k.shape[1:])), v.new_empty((n, *v.shape[1:]))) for k, v in cache.kv]
        return _StateTable(PatchedStates(kv, cache.precision))

    def _store_states(self, variants: Variants, table: _StateTable | None) -> torch.Tensor:
        """Append the states of this call's kept forwards; ``[V]`` their ids (-1: not kept; all, with no table)."""
        state = torch.full((variants.n,), -1, dtype=torch.long)
        if table is None or not table.used:
            return state
        idx = torch.cat(table.variants)
        n = table.used
        kv = [(k, v) if n == table.capacity else (k[:n].clone(), v[:n].clone()) for k, v in table.states.kv]
        precision = table.states.precision
        sets = variants.take(idx)
        sets.parent = None
        if self.states is not None and self.states.precision == precision and self._state_sets is not None:
            base = self.states.n
            kv = [(torch.cat([a, k]), torch.cat([b, v])) for (a, b), (k, v) in zip(self.states.kv, kv)]
            sets = Variants.concat([self._state_sets, sets])
        else:  # none kept yet, or kept in another precision (those are dropped)
            base = 0
        self.states, self._state_sets = PatchedStates(kv, precision), sets
        state[idx] = base + torch.arange(idx.numel())
        return state

    # -------------------------------------------------------------- prefix reuse
    def _chunk_for(self, run_len: int) -> int:
        """Variants per forward of ``run_len`` positions (sized once per length: the free memory is read
        once per batch, as for whole prompts)."""
        if not self.auto_chunk or run_len >= self.batch.seq_len:
            return self.chunk
        n = self._chunks.get(run_len)
        if n is None:
            n = self._chunks[run_len] = auto_chunk(self.model, self.batch.seq_len, run_len=run_len)
        return n

    def _first_changed(
        self, variants: Variants, extra_offsets: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``[V]`` the first position and ``[V]`` the first layer each variant can change, from its entries,
        and ``[V]`` the kept state each starts from (-1: the clean run).

        A removal writes at its occurrence's position, into the MLP outputs of its source layer and
        later ones; so a variant changes nothing before its earliest entry's position, nor below its
        lowest entry's layer. A complement (every active occurrence but the listed ones removed)
        changes nothing before the prompt's first active position or below its lowest active layer;
        ``extra_offsets`` nothing before their first nonzero position and layer. ``(T, L - 1)`` when
        nothing changes. Offsets are zero there by construction (:meth:`offsets` refuses an entry
        before its start).

        A variant with a parent state starts where its removals first differ from the parent's
        (:meth:`_diverge`), when that is later than where they first differ from the clean run's;
        otherwise it starts from the clean run. Its first layer is still its own lowest: the
        suffix's residual at that layer is the clean one.
        """
        T, L, V = self.batch.seq_len, self.clt.n_layers, variants.n
        pos, lay = self.occ.pos.cpu(), self.occ.layer.cpu()
        first = torch.full((V,), T, dtype=torch.long)
        layer = torch.full((V,), L - 1, dtype=torch.long)
        if variants.occ.numel():
            first.scatter_reduce_(0, variants.var, pos[variants.occ], reduce="amin")
            layer.scatter_reduce_(0, variants.var, lay[variants.occ], reduce="amin")
        comp = variants.complement
        if comp.any():
            first_active, low_active = self._active_bounds()
            first[comp] = first_active[variants.prompt[comp]]
            layer[comp] = low_active[variants.prompt[comp]]
        if extra_offsets is not None:
            nz = (extra_offsets != 0).any(dim=3).cpu()  # [L, B, T]
            at = torch.arange(T).expand_as(nz)
            p_first = torch.where(nz, at, torch.full_like(at, T)).amin(dim=(0, 2))  # [B]
            ls = torch.arange(L)[:, None, None].expand_as(nz)
            l_first = torch.where(nz, ls, torch.full_like(ls, L - 1)).amin(dim=(0, 2))  # [B]
            first = torch.minimum(first, p_first[variants.prompt])
            layer = torch.minimum(layer, l_first[variants.prompt])
        parent = torch.full((V,), -1, dtype=torch.long)
        if variants.parent is not None and extra_offsets is None and self.states is not None:
            if self.states.precision == parameter_precision(self.model):
                diverge = self._diverge(variants)
                later = (variants.parent >= 0) & (diverge > first)
                parent = torch.where(later, variants.parent, parent)
                first = torch.where(later, diverge, first)
        return first, layer, parent

    def _active_bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B]`` each prompt's first active position (T: none) and ``[B]`` its lowest active layer (L - 1)."""
        if self._bounds is None:
            T, L, B = self.batch.seq_len, self.clt.n_layers, self.batch.size
            prompt, pos, lay = self.occ.prompt.cpu(), self.occ.pos.cpu(), self.occ.layer.cpu()
            first = torch.full((B,), T, dtype=torch.long).scatter_reduce_(0, prompt, pos, "amin")
            low = torch.full((B,), L - 1, dtype=torch.long).scatter_reduce_(0, prompt, lay, "amin")
            self._bounds = (first, low)
        return self._bounds

    def _diverge(self, variants: Variants) -> torch.Tensor:
        """``[V]`` the first position where each variant's removals differ from its parent state's (T: nowhere).

        Two removal sets differ where an occurrence's removed weight differs. For two plain sets or
        two complements (e.g. a kept set against the null, every active occurrence removed) that is
        where their listed entries' weights differ; a plain set against a complement is taken to
        differ from the prompt's first active position on (never later than the truth, so never wrong).
        """
        T, V = self.batch.seq_len, variants.n
        diverge = torch.full((V,), T, dtype=torch.long)
        assert variants.parent is not None and self._state_sets is not None
        sets = self._state_sets
        par = variants.parent
        has = (par >= 0).nonzero().squeeze(-1)
        if has.numel() == 0:
            return diverge
        if bool((par[has] >= sets.n).any()):
            raise ValueError(f"parent state id beyond the {sets.n} kept states (released, or from another evaluator?)")
        if not torch.equal(sets.prompt[par[has]], variants.prompt[has]):
            raise ValueError("a variant's parent state is another prompt's")
        pos = self.occ.pos.cpu()
        mixed = has[sets.complement[par[has]] != variants.complement[has]]
        if mixed.numel():
            diverge[mixed] = self._active_bounds()[0][variants.prompt[mixed]]
        same = torch.zeros(V, dtype=torch.bool)
        same[has] = sets.complement[par[has]] == variants.complement[has]
        # signed entries: +weight for the variant's, -weight for its parent's, summed per (variant, occurrence)
        own = same[variants.var]
        v_own, o_own = variants.var[own], variants.occ[own]
        w_own = (
            variants.weight[own].double()
            if variants.weight is not None
            else torch.ones(v_own.numel(), dtype=torch.double)
        )
        kids = same.nonzero().squeeze(-1)
        s_order = torch.argsort(sets.var, stable=True)
        s_var = sets.var[s_order]
        lo = torch.searchsorted(s_var, par[kids])
        hi = torch.searchsorted(s_var, par[kids], right=True)
        n_ent = hi - lo
        v_par = kids.repeat_interleave(n_ent)
        offs = torch.arange(int(n_ent.sum())) - torch.repeat_interleave(torch.cumsum(n_ent, 0) - n_ent, n_ent)
        e_par = s_order[lo.repeat_interleave(n_ent) + offs]
        o_par = sets.occ[e_par]
        w_par = (
            sets.weight[e_par].double() if sets.weight is not None else torch.ones(e_par.numel(), dtype=torch.double)
        )
        N = len(self.occ)
        keys = torch.cat([v_own * N + o_own, v_par * N + o_par])
        vals = torch.cat([w_own, -w_par])
        if keys.numel():
            uniq, inv = torch.unique(keys, return_inverse=True)
            sums = torch.zeros(uniq.numel(), dtype=torch.double).index_add_(0, inv, vals)
            diff = uniq[sums != 0]
            diverge.scatter_reduce_(0, diff // N, pos[diff % N], reduce="amin")
        return diverge

    def _prefix_groups(self, first: torch.Tensor, layer: torch.Tensor) -> list[tuple[int, int, int, int]]:
        """Split variants sorted by (``layer``, ``first``) into ``(lo, hi, start, layer)`` runs sharing forwards.

        A run starts at the earliest position and the lowest layer of its variants. Every distinct
        (layer, position) could have forwards of its own, but each forward costs
        :data:`TRACE_COST_POSITIONS`; a dynamic program over contiguous runs of the distinct keys
        picks the runs with the fewest (position x layer)s run plus overheads.
        """
        T, L = self.batch.seq_len, self.clt.n_layers
        keys, counts = torch.unique_consecutive(
            torch.stack([layer, first.clamp(max=T - 1)], dim=1), dim=0, return_counts=True
        )
        lay_l, pos_l, counts_l = keys[:, 0].tolist(), keys[:, 1].tolist(), counts.tolist()
        m = len(counts_l)
        bounds = [0]
        for c in counts_l:
            bounds.append(bounds[-1] + c)
        overhead = TRACE_COST_POSITIONS.get(self.model.device.type, TRACE_COST_POSITIONS["cuda"])
        best = [0.0] + [float("inf")] * m
        cut = [0] * (m + 1)
        for j in range(1, m + 1):
            low = T
            for i in range(j - 1, -1, -1):  # run = distinct keys i..j-1: layer lay_l[i], from min position
                low = min(low, pos_l[i])
                n = bounds[j] - bounds[i]
                run = T - exact_suffix_start(T, low, self.model.pads_short_query_blocks, n)
                cost = best[i] + n * run * (L - lay_l[i]) / L + overhead * -(-n // self._chunk_for(run))
                if cost < best[j]:
                    best[j], cut[j] = cost, i
        runs = []
        j = m
        while j > 0:
            i = cut[j]
            runs.append((bounds[i], bounds[j], min(pos_l[i:j]), lay_l[i]))
            j = i
        return runs[::-1]

    def use_prefix_cache(self, cache: PrefixCache) -> None:
        """Take the clean runs' keys and values from a forward already run (the batch's pair forward,
        :class:`pie_lib.prune.context.BatchContext`) instead of running one when first needed."""
        if not self.reuse_prefix:
            raise SettingError("this evaluator runs whole prompts; it has no use for a prefix cache")
        self._prefix[cache.precision] = cache

    def prefix_cache(self) -> PrefixCache:
        """The clean runs' keys and values in the model's current precision (one forward, once each)."""
        key = parameter_precision(self.model)
        if key not in self._prefix:
            self._prefix[key] = clean_prefix_cache(self.model, self.batch.clean_ids)
        return self._prefix[key]

    def _run_remote(
        self,
        variants: Variants,
        order: torch.Tensor,
        var_sorted: torch.Tensor,
        extra_offsets: torch.Tensor | None,
        metric: torch.Tensor,
        kl: torch.Tensor,
        change: torch.Tensor,
    ) -> None:
        """Remote: the chunks of this call go as one request (one session of traces), or one per
        ``request_bytes`` of offsets; offsets are built group by group so memory stays bounded."""
        V = variants.n
        pending: list[tuple[int, int, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        size = 0

        def flush() -> None:
            nonlocal size
            outs = patched_last_logits_many(
                self.model,
                [(ids, off) for _, _, ids, off, _ in pending],
                with_logsumexp=self.metric == "logsumexp",
                max_request_bytes=1 << 62,
            )
            for (lo, hi, _, _, prompts), (logits, lse) in zip(pending, outs):
                metric[lo:hi], kl[lo:hi], change[lo:hi] = self._finish_range(prompts, logits, lse)
            self.n_forwards += len(pending)
            self.n_sequences += sum(hi - lo for lo, hi, *_ in pending)
            pending.clear()
            size = 0

        for lo in range(0, V, self.chunk):
            hi = min(V, lo + self.chunk)
            ids, off, prompts = self._prepare_range(variants, order, var_sorted, lo, hi, extra_offsets)
            assert isinstance(off, torch.Tensor)  # not asked for sparse offsets: a request ships dense ones
            nbytes = off.numel() * off.element_size()
            if pending and size + nbytes > self.request_bytes:
                flush()
            pending.append((lo, hi, ids, off, prompts))
            size += nbytes
        if pending:
            flush()

    def _run_range(
        self,
        variants: Variants,
        order: torch.Tensor,
        var_sorted: torch.Tensor,
        start: int,
        stop: int,
        extra_offsets: torch.Tensor | None,
        first: int = 0,
        first_layer: int = 0,
        parent: torch.Tensor | None = None,
        keep: torch.Tensor | None = None,
        table: _StateTable | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Metric, KL and argmax change of variants ``start:stop`` (one forward).

        ``first``, ``first_layer``: none of these variants changes anything before this position
        or below this layer (:meth:`_first_changed`; against its parent state where ``parent[v] >=
        0``); with prefix reuse the forward starts there (the position moved earlier where
        :func:`~pie_lib.engine.traces.exact_suffix_start` says so). ``keep``: whose states to write into
        ``table`` while it has room.

        On a CPU a forward of 1-3 sequences gets copies of its last one up to
        :data:`~pie_lib.models.native.common.MIN_MATMUL_ROWS`: torch's CPU matmul computes inputs of
        1-3 rows (the unembedding of the last positions) along another path, so without them a
        variant's outcome would depend, in its last bits, on how many others share its forward.
        """
        n = stop - start
        pad = MIN_MATMUL_ROWS - n if self.model.device.type == "cpu" and n < MIN_MATMUL_ROWS else 0
        pos = (
            exact_suffix_start(self.batch.seq_len, first, self.model.pads_short_query_blocks, n + pad)
            if self.reuse_prefix
            else 0
        )
        rows = parent[start:stop] if parent is not None else None
        if rows is not None and not bool((rows >= 0).any()):
            rows = None
        ids, off, prompts = self._prepare_range(
            variants, order, var_sorted, start, stop, extra_offsets, pos, rows, sparse=True
        )
        if pad:
            rep = torch.cat([torch.arange(n), torch.full((pad,), n - 1)])
            ids, prompts = ids[rep], prompts[rep]
            off = off.take(rep) if isinstance(off, SparseOffsets) else off[:, rep.to(off.device)]
            rows = rows[rep] if rows is not None else None
        prefix = None
        if self.reuse_prefix:
            states = self.states if rows is not None else None
            prefix = Prefix(self.prefix_cache(), prompts, pos, first_layer, states, rows)
        want = None
        if prefix is not None and keep is not None and table is not None:  # as many as the table still holds
            want = keep[start:stop].nonzero().squeeze(-1)[: table.capacity - table.used]
        if prefix is not None and want is not None and table is not None and want.numel():
            logits = patched_suffix_with_states(self.model, ids, off, prefix, want, table.states, table.used)
            table.variants.append(want + start)
            table.used += int(want.numel())
            lse = None
        else:
            logits, lse = patched_last_logits(
                self.model, ids, off, with_logsumexp=self.metric == "logsumexp", prefix=prefix
            )
        if pad:
            logits, prompts = logits[:n], prompts[:n]
            lse = lse[:n] if lse is not None else None
        self.n_forwards += 1
        self.n_sequences += stop - start
        run = self.batch.seq_len - pos
        self.n_positions += (stop - start) * run
        self.n_layer_positions += (stop - start) * run * (self.clt.n_layers - (first_layer + 1 if prefix else 0))
        return self._finish_range(prompts, logits, lse)

    def _prepare_range(
        self,
        variants: Variants,
        order: torch.Tensor,
        var_sorted: torch.Tensor,
        start: int,
        stop: int,
        extra_offsets: torch.Tensor | None,
        pos: int = 0,
        parent: torch.Tensor | None = None,
        sparse: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | SparseOffsets, torch.Tensor]:
        """Input ids ``[v, T]``, offsets ``[L, v, T - pos, D]`` of positions ``pos..T-1`` and batch rows
        ``[v]`` of variants ``start:stop`` (``pos`` > 0: nothing of theirs changes before it, or, where
        ``parent[v] >= 0``, nothing differs from that state before it: its entries before ``pos``,
        which write only there, are the state's).

        ``sparse``: without ``extra_offsets``, the listed entries' offsets are summed sparsely where
        :meth:`sparse_offsets` gives them: plain removal sets get
        :class:`~pie_lib.engine.traces.SparseOffsets`; a chunk with complements, whose offsets ``null -
        kept`` fill every active row, a dense tensor written from the null's rows and those sparse ones
        (:meth:`_complement_offsets`). The bits are the dense path's either way."""
        lo, hi = torch.searchsorted(var_sorted, torch.tensor([start, stop]))
        ent = order[lo:hi]
        if parent is not None and pos > 0:
            inherited = (parent[variants.var[ent] - start] >= 0) & (self.occ.pos.cpu()[variants.occ[ent]] < pos)
            ent = ent[~inherited]
        w = variants.weight[ent] if variants.weight is not None else None
        prompts = variants.prompt[start:stop]
        comp = variants.complement[start:stop]
        if sparse and extra_offsets is None:
            few = self.sparse_offsets(variants.var[ent] - start, variants.occ[ent], w, stop - start, pos)
            if few is not None:
                if bool(comp.any()):
                    return self.batch.clean_ids[prompts], self._complement_offsets(few, prompts, comp, pos), prompts
                return self.batch.clean_ids[prompts], few, prompts
        off = self.offsets(variants.var[ent] - start, variants.occ[ent], w, stop - start, pos)
        if comp.any():
            null = self.null_offsets()[:, prompts.to(self.model.device), pos:]
            c = comp.to(off.device)[None, :, None, None]
            off = torch.where(c, null - off, off)
        if extra_offsets is not None:
            off = off + extra_offsets[:, prompts.to(extra_offsets.device), pos:].to(off)
        return self.batch.clean_ids[prompts], off, prompts

    def _complement_offsets(
        self, few: SparseOffsets, prompts: torch.Tensor, comp: torch.Tensor, pos: int
    ) -> Float[Tensor, "L v P D"]:
        """Dense offsets of a chunk with complements from its listed entries' sparse rows ``few``: a
        complement's ``null - listed`` (the null's rows of its prompt from ``pos``, less its rows), a plain
        set's own rows (zeros elsewhere). Bitwise the dense path's ``where(comp, null - off, off)``:
        ``null - 0`` is ``null``, and the written rows get the same subtraction or the same values."""
        dev = self.model.device
        off = self.null_offsets()[:, prompts.to(dev), pos:]  # [L, v, P, D]; advanced indexing: a copy
        comp = comp.to(dev)
        if not bool(comp.all()):
            off[:, ~comp] = 0
        D = off.shape[-1]
        for layer, (idx, rows) in enumerate(zip(few.idx, few.rows)):
            if idx.numel() == 0:
                continue
            c = comp[idx // few.positions]
            subtract_rows(off[layer], idx[c], rows[c])  # in place: off[layer] is contiguous
            off[layer].view(-1, D)[idx[~c]] = rows[~c]
        return off

    def _finish_range(
        self, prompts: torch.Tensor, logits: torch.Tensor, lse: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Metric, KL and argmax change from one forward's last-token logits."""
        logits = logits.float()
        clean = self.clean_logits[prompts.to(self.clean_logits.device)]
        kl = last_token_kl(clean, logits)
        change = clean.argmax(-1) != logits.argmax(-1)
        if self.metric == "logit_diff":
            metric = metric_value(logits, self.batch.correct[prompts], self.batch.wrong[prompts], "logit_diff")
        else:
            assert lse is not None  # metric "logsumexp": every forward returns its logsumexp
            metric = lse.float()
        return metric, kl, change  # on the device: the caller copies them to the host once

    def clean_metric(self) -> torch.Tensor:
        """``[B]`` metric of the unpatched clean runs."""
        if self.m_clean is None:  # logsumexp needs every position: run the zero-offset forward once
            res = self.run(
                Variants(
                    torch.arange(self.batch.size),
                    torch.zeros(0, dtype=torch.long),
                    torch.zeros(0, dtype=torch.long),
                    torch.zeros(self.batch.size, dtype=torch.bool),
                )
            )
            self.m_clean = res.metric
        return self.m_clean.cpu().float()


def _first_nonzero(offsets: torch.Tensor) -> torch.Tensor:
    """``[B]`` first position with a nonzero offset in ``offsets`` ``[L, B, T, D]`` (T where none)."""
    T = offsets.shape[2]
    nz = (offsets != 0).any(dim=3).any(dim=0)  # [B, T]
    idx = torch.arange(T, device=offsets.device).expand_as(nz)
    return torch.where(nz, idx, torch.full_like(idx, T)).amin(dim=1)


def _unique_variants(variants: Variants) -> tuple[Variants | None, torch.Tensor | None]:
    """(the distinct variants, index of each original among them), or (None, None) if all differ.

    Two variants are the same when prompt, complement flag and the multiset of (occurrence,
    weight) entries agree; their outcomes are then the same forward, so it runs once.
    """
    V = variants.n
    if V < 2:
        return None, None
    order = (
        torch.argsort(
            variants.var * (int(variants.occ.max()) + 1 if variants.occ.numel() else 1) + variants.occ, stable=True
        )
        if variants.occ.numel()
        else torch.zeros(0, dtype=torch.long)
    )
    var_s, occ_s = variants.var[order].numpy(), variants.occ[order].numpy()
    w_s = variants.weight[order].float().numpy() if variants.weight is not None else None
    bounds = np.searchsorted(var_s, np.arange(V + 1))
    prompt, comp = variants.prompt.tolist(), variants.complement.tolist()
    seen: dict[tuple, int] = {}
    first: list[int] = []
    inverse = np.empty(V, dtype=np.int64)
    for v in range(V):
        lo, hi = bounds[v], bounds[v + 1]
        key = (prompt[v], comp[v], occ_s[lo:hi].tobytes(), w_s[lo:hi].tobytes() if w_s is not None else b"")
        j = seen.setdefault(key, len(first))
        if j == len(first):
            first.append(v)
        inverse[v] = j
    if len(first) == V:
        return None, None
    keep = torch.tensor(first)
    new_id = torch.full((V,), -1, dtype=torch.long)
    new_id[keep] = torch.arange(keep.numel())
    ent = new_id[variants.var] >= 0
    uniq = Variants(
        prompt=variants.prompt[keep],
        var=new_id[variants.var[ent]],
        occ=variants.occ[ent],
        complement=variants.complement[keep],
        weight=variants.weight[ent] if variants.weight is not None else None,
        parent=variants.parent[keep] if variants.parent is not None else None,  # the first copy's: outcomes ignore it
    )
    return uniq, torch.from_numpy(inverse)
