"""A straightforward, per-occurrence / per-forward implementation of PIE's prune stage.

This is the yardstick for ``benchmarks/prune_speed.py``: it does the same work as pie_lib's
vectorised, batched code, written the way a first implementation of ``pie-method.md`` §2-§4 would
be -- Python loops over occurrences, one real-model forward per evaluation.

To isolate *vectorisation and batching* (and nothing else), it reuses everything pie_lib computes
once per batch: the clean/corrupted caches and the active set (``ctx.occ``), the metric gradients
(``ctx.grads(mode)``), the clean metric and logits, the nnsight patch trace
(:func:`pie_lib.engine.traces.patched_last_logits`, called with a batch of ONE prompt) and the
seeded scores of the Random baseline. What it does on its own:

- FAP / CLT-RelP scores: ``sum_{s>=l} <Δa · W_dec[l][f, s-l], g_s(t)>`` by a Python loop over
  occurrences (one decoder-row fetch and ``L-l`` dot products each);
- FAP-Synergy (spec §4): one forward per ``M(...)`` evaluation (singles and pairs unbatched),
  the partner draws from one ``random.Random(seed + 1337)`` per prompt, as the reference does;
- the K-ladder evaluation: one forward per (method, K, prompt) for the circuit, one for its
  complement, and one null forward per prompt; removal offsets summed occurrence by occurrence.

Everything returned is aligned with pie_lib's flat occurrence order, so selections compare as
boolean masks and KLs as ``[J, B]`` tensors.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import torch

from pie_lib.engine.traces import patched_last_logits
from pie_lib.prune.context import BatchContext
from pie_lib.prune.scores import random_scores
from pie_lib.prune.select import SynergyConfig


@dataclass
class NaiveCounters:
    """How much work the naive path did (forwards are batch-1 traces)."""

    forwards: int = 0
    row_fetches: int = 0


class NaiveReference:
    """Per-occurrence / per-forward reimplementation on top of a pie_lib :class:`BatchContext`.

    Args:
        ctx: pie_lib's batch context (caches, active set and gradients are reused from it).
    """

    def __init__(self, ctx: BatchContext) -> None:
        self.ctx = ctx
        self.model, self.clt, self.batch, self.occ = ctx.model, ctx.clt, ctx.batch, ctx.occ
        self.corruption = ctx.cfg.corruption
        self.rows_dtype = ctx.cfg.rows_dtype
        self.counters = NaiveCounters()
        self._scores: dict[str, torch.Tensor] = {}
        starts = self.occ.offsets().cpu().tolist()
        self.ranges = [(starts[b], starts[b + 1]) for b in range(self.occ.n_prompts)]
        # plain Python views of the occurrences (the naive code indexes them one by one)
        self.layer = self.occ.layer.cpu().tolist()
        self.pos = self.occ.pos.cpu().tolist()
        self.feat = self.occ.feat.cpu().tolist()
        da = self.occ.a_clean - self.occ.a_corr if self.corruption == "corrupted" else self.occ.a_clean
        self.delta = da.cpu().double().tolist()
        self.clean_logits = ctx.evaluator.clean_logits.float()
        self.m_clean = ctx.evaluator.clean_metric().double().tolist()
        self.correct = self.batch.correct.tolist()
        self.wrong = self.batch.wrong.tolist()

    # ------------------------------------------------------------------ scores (spec §2.6)
    def _row(self, n: int) -> torch.Tensor:
        """Decoder row ``W_dec[l][f]`` ``[L-l, D]`` of occurrence ``n``, fetched on its own."""
        self.counters.row_fetches += 1
        l, f = self.layer[n], self.feat[n]
        return self.clt.decoder_rows(l, torch.tensor([f], device=self.clt.device))[0].to(self.rows_dtype)

    def fap_scores(self, mode: str = "replacement") -> torch.Tensor:
        """``S(l,t,i) = sum_{s>=l} <Δa · W_dec[l][i, s-l], g_s(t)>``, one occurrence at a time.

        ``mode="relp"`` gives CLT-RelP (same form, relevance instead of the gradient).
        """
        g = self.ctx.grads(mode)
        out = torch.zeros(len(self.occ), dtype=torch.float32)
        prompt = self.occ.prompt.cpu().tolist()
        for n in range(len(self.occ)):
            l, b, t = self.layer[n], prompt[n], self.pos[n]
            W = self._row(n)  # [L - l, D]
            da = self.delta[n]
            total = 0.0
            for j in range(W.shape[0]):
                s = l + j
                total += float(torch.dot(da * W[j], g[s, b, t].to(W)))
            out[n] = total
        return out

    # ------------------------------------------------------------------ one patched forward
    def _offsets(self, b: int, removed: list[int]) -> torch.Tensor:
        """``[L, 1, T, D]`` sum of the delta writes of ``removed`` (global occurrence ids of prompt b)."""
        L, T, D = self.clt.n_layers, self.batch.seq_len, self.clt.d_model
        off = torch.zeros(L, 1, T, D, dtype=torch.float32, device=self.model.device)
        for n in removed:
            l, t = self.layer[n], self.pos[n]
            W = self._row(n)
            off[l : l + W.shape[0], 0, t] += (self.delta[n] * W).to(off)
        return off

    def _forward(self, b: int, removed: list[int]) -> torch.Tensor:
        """Last-token logits ``[V]`` of prompt b with ``removed`` occurrences removed (one forward)."""
        ids = self.batch.clean_ids[b : b + 1]
        logits, _ = patched_last_logits(self.model, ids, self._offsets(b, removed))
        self.counters.forwards += 1
        return logits[0].float()

    def _metric(self, b: int, logits: torch.Tensor) -> float:
        return float(logits[self.correct[b]] - logits[self.wrong[b]])

    def M(self, b: int, removed: list[int]) -> float:
        """``M(S) = m_clean - m(S removed)`` (logit-difference metric), one forward."""
        return self.m_clean[b] - self._metric(b, self._forward(b, removed))

    # ------------------------------------------------------------------ selections
    def _order(self, b: int, scores: torch.Tensor) -> list[int]:
        """Global ids of prompt b's occurrences by |score| descending (ties: occurrence order)."""
        lo, hi = self.ranges[b]
        s = scores.tolist()
        return sorted(range(lo, hi), key=lambda n: -abs(s[n]))

    def topk(self, scores: torch.Tensor, kv: list[int]) -> torch.Tensor:
        """Keep mask ``[N]``: the top ``kv[b]`` occurrences of each prompt by |score|."""
        keep = torch.zeros(len(self.occ), dtype=torch.bool)
        for b in range(self.occ.n_prompts):
            for n in self._order(b, scores)[: kv[b]]:
                keep[n] = True
        return keep

    def synergy(self, scores: torch.Tensor, kv: list[int], cfg: SynergyConfig) -> torch.Tensor:
        """FAP-Synergy boundary reranking (spec §4), prompt by prompt, one forward per ``M``."""
        keep = torch.zeros(len(self.occ), dtype=torch.bool)
        s_abs = [abs(x) for x in scores.tolist()]
        for b in range(self.occ.n_prompts):
            order = self._order(b, scores)
            n = len(order)
            if n == 0:
                continue
            K = min(kv[b], n)
            half = int(round(cfg.boundary_percent / 100.0 * K * 0.5))
            core_k = max(0, K - half)
            boundary = order[core_k : min(n, K + half)][: cfg.boundary_cap]
            partners = order[: min(cfg.partners, core_k)]
            top = sorted(s_abs[i] for i in order[:K])
            base_scale = max(top[(len(top) - 1) // 2], 1e-6)  # lower median, as the reference
            # a zero write changes nothing: its effect is 0 without a forward
            eff_p = [self.M(b, [p]) if self.delta[p] != 0 else 0.0 for p in partners]
            med_partner = max(float(np.median(np.abs(eff_p))) if eff_p else 1.0, 1e-6)
            rng = random.Random(cfg.seed + 1337)
            boosted = []
            for c in boundary:
                base_z = s_abs[c] / base_scale
                if self.delta[c] == 0 or not partners:
                    boosted.append(base_z)
                    continue
                mates = rng.sample(range(len(partners)), min(cfg.partners_per_candidate, len(partners)))
                eff_c = self.M(b, [c])
                syn = []
                for i in mates:
                    if eff_p[i] > 0 and eff_c > 0:
                        syn.append(self.M(b, [c, partners[i]]) - eff_c - eff_p[i])
                syn_stat = float(np.median(syn)) if syn else 0.0
                boosted.append(base_z + cfg.lam * max(0.0, syn_stat) / (med_partner + 1e-6))
            chosen = set(order[:core_k])
            ranked = sorted(range(len(boundary)), key=lambda j: -boosted[j])
            chosen.update(boundary[j] for j in ranked[: K - core_k])
            for i in order:  # fill any shortfall in |S| order
                if len(chosen) >= K:
                    break
                chosen.add(i)
            for i in chosen:
                keep[i] = True
        return keep

    def select(self, method: str, kv: list[int], seed: int, syn_cfg: SynergyConfig) -> torch.Tensor:
        """Keep mask ``[N]`` of one of: fap, fap-synergy, clt-relp, act-mag, random."""
        if method == "fap":
            return self.topk(self.cached("fap", lambda: self.fap_scores("replacement")), kv)
        if method == "clt-relp":
            return self.topk(self.cached("relp", lambda: self.fap_scores("relp")), kv)
        if method == "act-mag":
            return self.topk(self.occ.a_clean.abs().cpu().float(), kv)
        if method == "random":  # pie_lib's seeded hash: the draw itself is not what we time
            return self.topk(random_scores(self.occ, self.batch.prompt_idx, seed), kv)
        if method == "fap-synergy":
            cfg = SynergyConfig(**{**syn_cfg.__dict__, "seed": seed})
            return self.synergy(self.cached("fap", lambda: self.fap_scores("replacement")), kv, cfg)
        raise ValueError(f"the naive reference implements fap, fap-synergy, clt-relp, act-mag, random; not {method!r}")

    def cached(self, key: str, fn):
        """Memoise a score vector (FAP is shared by fap and fap-synergy, as in pie_lib)."""
        if key not in self._scores:
            self._scores[key] = fn()
        return self._scores[key]

    # ------------------------------------------------------------------ evaluation (spec §3)
    def evaluate(self, keeps: torch.Tensor) -> dict[str, torch.Tensor]:
        """Circuit / complement / null forwards, one prompt and one variant at a time.

        Args:
            keeps: ``[J, N]`` keep masks.
        Returns:
            ``[J, B]`` kl, pred_change, faithfulness, completeness, m_circuit, m_complement and
            ``[B]`` m_null, kl_null.
        """
        J, B = keeps.shape[0], self.occ.n_prompts
        out = {
            k: torch.zeros(J, B, dtype=torch.float64)
            for k in ("kl", "faithfulness", "completeness", "m_circuit", "m_complement")
        }
        out["pred_change"] = torch.zeros(J, B, dtype=torch.bool)
        m_null, kl_null = torch.zeros(B, dtype=torch.float64), torch.zeros(B, dtype=torch.float64)
        for b in range(B):
            lo, hi = self.ranges[b]
            clean = self.clean_logits[b]
            p_log = torch.log_softmax(clean.double(), -1)

            def kl_of(logits: torch.Tensor) -> float:
                q_log = torch.log_softmax(logits.double(), -1)
                return max(0.0, float((p_log.exp() * (p_log - q_log)).sum()))

            null_logits = self._forward(b, list(range(lo, hi)))
            m_null[b] = self._metric(b, null_logits)
            kl_null[b] = kl_of(null_logits)
            den = self.m_clean[b] - m_null[b]
            for j in range(J):
                kept = [n for n in range(lo, hi) if keeps[j, n]]
                removed = [n for n in range(lo, hi) if not keeps[j, n]]
                circ = self._forward(b, removed)
                comp = self._forward(b, kept)
                mc, mk = self._metric(b, circ), self._metric(b, comp)
                out["m_circuit"][j, b], out["m_complement"][j, b] = mc, mk
                out["kl"][j, b] = kl_of(circ)
                out["pred_change"][j, b] = bool(clean.argmax() != circ.argmax())
                out["faithfulness"][j, b] = (mc - m_null[b]) / den if abs(den) > 1e-8 else math.nan
                out["completeness"][j, b] = (mk - m_null[b]) / den if abs(den) > 1e-8 else math.nan
        out["m_null"], out["kl_null"] = m_null, kl_null
        return out
