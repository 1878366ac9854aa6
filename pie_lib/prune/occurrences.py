"""Tokenised pair batches and their active feature occurrences (spec §1-§2).

An *occurrence* is (layer l, position t, feature i) of one prompt. The active set of a pair is
the union of occurrences active in its clean or its corrupted run; the inactive side counts as 0.
Occurrences of a batch are kept flat (COO), sorted by (prompt, layer, position, feature) -- the
reference's order, which also fixes how ties are broken.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from pie_lib.clt.transcoder import CrossLayerTranscoder
from pie_lib.data.pairs import Pair
from pie_lib.engine.traces import ForwardCache, run_with_cache
from pie_lib.errors import NumericalError, SettingError, ShapeMismatchError
from pie_lib.models.loading import LoadedModel

Corruption = Literal["corrupted", "zero"]


@dataclass
class PairBatch:
    """Pairs of one token length T, ready for the model.

    Attributes:
        clean_ids, corr_ids: ``[B, T]`` token ids (corrupted cut to the clean length).
        correct, wrong: ``[B]`` target token ids (last token of each target string).
        prompt_idx: ``[B]`` index of each pair in the caller's list.
    """

    clean_ids: Int[Tensor, "B T"]
    corr_ids: Int[Tensor, "B T"]
    correct: Int[Tensor, " B"]
    wrong: Int[Tensor, " B"]
    prompt_idx: Int[Tensor, " B"]

    @property
    def size(self) -> int:
        return self.clean_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.clean_ids.shape[1]

    def subset(self, rows: torch.Tensor) -> "PairBatch":
        return PairBatch(
            self.clean_ids[rows], self.corr_ids[rows], self.correct[rows], self.wrong[rows], self.prompt_idx[rows]
        )


@dataclass
class TokenizedPairs:
    """All usable pairs grouped into equal-length batches, plus what was skipped and why.

    Attributes:
        batches: equal-length batches.
        skipped: pair index -> why it was skipped (only prompts under ``min_tokens``).
        n_last_token_targets: pairs with a multi-token target whose last token was used
            (``target_token="last"``).
        n_cut_corrupted: pairs whose corrupted prompt was cut to the clean length (``cut_corrupted``).
    """

    batches: list[PairBatch]
    skipped: dict[int, str] = field(default_factory=dict)
    n_last_token_targets: int = 0
    n_cut_corrupted: int = 0


TargetToken = Literal["single", "last"]


def _where(pair: Pair, i: int) -> str:
    """``pairs.jsonl:17: pair 16`` for a file's pair, ``pair 16`` for an in-memory one."""
    return f"{pair.where}: pair {i}" if pair.where else f"pair {i}"


def tokenize_pairs(
    model: LoadedModel,
    pairs: list[Pair],
    batch_size: int = 16,
    min_tokens: int = 0,
    max_tokens: int | None = None,
    target_token: TargetToken = "single",
    cut_corrupted: bool = False,
) -> TokenizedPairs:
    """Tokenise pairs and group them by clean length (no padding, so batching is exact).

    Nothing ambiguous is reinterpreted: a target that is several tokens, or a corrupted prompt of
    another token length than its clean prompt, is an error naming the pair (file and line) --
    unless the reference's behaviour is asked for explicitly: ``target_token="last"`` uses a
    target's last token, ``cut_corrupted=True`` cuts a longer corrupted prompt to the clean length.
    How many pairs each touched is returned. Prompts shorter than ``min_tokens`` are skipped and
    reported (the reference skips prompts under 8 tokens; pass 8 to match it).
    """
    if batch_size < 1:
        raise SettingError(f"batch size {batch_size}: must be a positive integer")
    if target_token not in ("single", "last"):
        raise SettingError(f"--target-token {target_token!r}: expected 'single' (default) or 'last'")
    clean = model.tokenize([p.text_clean for p in pairs])
    corr = model.tokenize([p.text_corr for p in pairs])
    cfg = model.config
    n_pos = getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None)
    groups: dict[int, list[int]] = {}
    skipped: dict[int, str] = {}
    rows: list[tuple[list[int], list[int], int, int]] = []
    n_last = n_cut = 0
    for i, (p, c, k) in enumerate(zip(pairs, clean, corr)):
        loc = _where(p, i)
        if max_tokens is not None:
            c = c[:max_tokens]
        if isinstance(n_pos, int) and len(c) > n_pos:
            raise ShapeMismatchError(
                f"{loc}: clean prompt has {len(c)} tokens, more than the model's {n_pos} positions; "
                "shorten it (or pass max_tokens)"
            )
        if len(c) < max(min_tokens, 2):
            if min_tokens <= len(c):  # not asked for: a prompt of nothing but BOS is a broken pair
                raise ShapeMismatchError(
                    f"{loc}: the clean prompt {p.text_clean!r} tokenises to nothing (only BOS); give it some text"
                )
            skipped[i] = f"{len(c)} tokens < min_tokens={min_tokens}"  # unused, so not checked further
            rows.append(([], [], 0, 0))
            continue
        if len(k) < len(c):
            raise ShapeMismatchError(
                f"{loc}: corrupted prompt has {len(k)} tokens but the clean prompt has {len(c)}; "
                "clean and corrupted prompts must have the same token length -- fix the pair"
            )
        if len(k) > len(c):
            if not cut_corrupted:
                raise ShapeMismatchError(
                    f"{loc}: corrupted prompt has {len(k)} tokens but the clean prompt has {len(c)}; clean and "
                    "corrupted prompts must have the same token length -- fix the pair, or pass --cut-corrupted "
                    "to cut corrupted prompts to the clean length (the reference's behaviour)"
                )
            n_cut += 1
        targets, multi = [], False
        for key in ("io_clean", "s_clean"):
            text = getattr(p, key)
            ids = model.target_ids(text)
            if not ids:
                raise ShapeMismatchError(
                    f"{loc}: {key} {text!r} tokenises to nothing; a target must be one token (e.g. ' Mary')"
                )
            if len(ids) > 1:
                if target_token != "last":
                    pieces = [model.tokenizer.decode([t]) for t in ids[:6]]
                    raise ShapeMismatchError(
                        f"{loc}: {key} {text!r} is {len(ids)} tokens {pieces}; the metric needs a one-token target "
                        "-- use a single-token target, or pass --target-token last to use its last token "
                        "(the reference's behaviour)"
                    )
                multi = True
            targets.append(int(ids[-1]))
        if targets[0] == targets[1]:
            raise ShapeMismatchError(
                f"{loc}: io_clean {p.io_clean!r} and s_clean {p.s_clean!r} are the same token ({targets[0]}); the "
                "logit difference would be 0 for every circuit -- the two targets must differ"
            )
        n_last += multi
        rows.append((c, k[: len(c)], *targets))
        groups.setdefault(len(c), []).append(i)
    batches = []
    for length in sorted(groups):
        idx = groups[length]
        for start in range(0, len(idx), batch_size):
            chunk = idx[start : start + batch_size]
            batches.append(
                PairBatch(
                    clean_ids=torch.tensor([rows[i][0] for i in chunk]),
                    corr_ids=torch.tensor([rows[i][1] for i in chunk]),
                    correct=torch.tensor([rows[i][2] for i in chunk]),
                    wrong=torch.tensor([rows[i][3] for i in chunk]),
                    prompt_idx=torch.tensor(chunk),
                )
            )
    return TokenizedPairs(batches, skipped, n_last_token_targets=n_last, n_cut_corrupted=n_cut)


@dataclass
class Occurrences:
    """Active occurrences of a batch, flattened. N = total over the batch's prompts.

    Attributes:
        prompt, layer, pos, feat: ``[N]`` int64 (prompt = row in the batch).
        a_clean, a_corr: ``[N]`` activations (0 where inactive on that side).
        n_prompts: B.
    """

    prompt: Int[Tensor, " N"]
    layer: Int[Tensor, " N"]
    pos: Int[Tensor, " N"]
    feat: Int[Tensor, " N"]
    a_clean: Float[Tensor, " N"]
    a_corr: Float[Tensor, " N"]
    n_prompts: int

    def __len__(self) -> int:
        return self.prompt.numel()

    def delta(self, corruption: Corruption = "corrupted") -> torch.Tensor:
        """Δa ``[N]``: a_clean - a_corr, or a_clean under zero-ablation."""
        return self.a_clean - self.a_corr if corruption == "corrupted" else self.a_clean

    def counts(self) -> torch.Tensor:
        """``[B]`` active occurrences per prompt."""
        return torch.bincount(self.prompt, minlength=self.n_prompts)

    def offsets(self) -> torch.Tensor:
        """``[B + 1]`` start of each prompt's occurrences (they are sorted by prompt)."""
        return torch.cat([torch.zeros(1, dtype=torch.long, device=self.prompt.device), self.counts().cumsum(0)])

    def triples(self, rows: torch.Tensor) -> list[list[int]]:
        """``[layer, position, feature]`` of occurrences ``rows`` as plain lists (for JSON)."""
        return torch.stack([self.layer[rows], self.pos[rows], self.feat[rows]], dim=1).tolist()


def active_occurrences(
    clt: CrossLayerTranscoder,
    clean: ForwardCache,
    corr: ForwardCache | None,
    zero_bos: bool = True,
) -> Occurrences:
    """Encode both runs and take the union of active occurrences.

    Each layer is encoded and read sparsely on its own (no dense ``[L, B, T, F]`` stack, and memory
    bounded by one layer's ``[B, T, F]``): the keys ``(b, l, t, f)`` are sorted by the union below, so
    the order they are gathered in does not matter, and each activation is read as the encoder
    computed it.

    Args:
        clean, corr: caches with ``resid_mid`` ``[L, B, T, D]``; ``corr`` None = zero corruption
            (the active set is the clean one, a_corr = 0).
        zero_bos: zero position 0 (BOS) activations, as the reference does.
    """
    L, B, T, _ = clean.resid_mid.shape
    F = clt.n_features
    keys, vals_c, vals_o = [], [], []
    for layer in range(L):
        for which, cache in (("c", clean), ("o", corr)):
            if cache is None:
                continue
            acts = clt.encode(cache.resid_mid[layer].to(clt.device), layer=layer)  # [B, T, F]
            if zero_bos:
                acts[:, 0] = 0
            idx = acts.nonzero()  # [n, 3] (b, t, f)
            v = acts[idx[:, 0], idx[:, 1], idx[:, 2]]
            key = ((idx[:, 0] * L + layer) * T + idx[:, 1]) * F + idx[:, 2]
            keys.append(key)
            vals_c.append(v if which == "c" else torch.zeros_like(v))
            vals_o.append(v if which == "o" else torch.zeros_like(v))
    if keys:
        key = torch.cat(keys)
        uniq, inv = torch.unique(key, return_inverse=True)  # sorted => (b, l, t, f) order
        a_c = torch.zeros(uniq.numel(), dtype=clt.dtype, device=uniq.device).index_add_(0, inv, torch.cat(vals_c))
        a_o = torch.zeros(uniq.numel(), dtype=clt.dtype, device=uniq.device).index_add_(0, inv, torch.cat(vals_o))
    else:
        uniq = torch.zeros(0, dtype=torch.long)
        a_c = a_o = torch.zeros(0, dtype=clt.dtype)
    f = uniq % F
    t = (uniq // F) % T
    l = (uniq // (F * T)) % L
    b = uniq // (F * T * L)
    # Occurrence bookkeeping lives on the CPU (it is small); rows, gradients and forwards stay on the device.
    return Occurrences(
        prompt=b.cpu(),
        layer=l.cpu(),
        pos=t.cpu(),
        feat=f.cpu(),
        a_clean=a_c.float().cpu(),
        a_corr=a_o.float().cpu(),
        n_prompts=B,
    )


def run_pair_caches(
    model: LoadedModel, batch: PairBatch, corruption: Corruption, keep_kv: bool = False
) -> tuple[ForwardCache, ForwardCache | None]:
    """Clean and corrupted forwards of a batch in one trace (the corrupted half only when needed).

    ``keep_kv``: the clean cache also holds the clean prompts' keys and values (a local model's
    prefix cache, :func:`pie_lib.engine.traces.prefix_cache_of`, without a forward of its own).
    NaN/Inf logits (corrupt weights, or a dtype that overflows) are an error naming the pairs.
    """
    ids = batch.clean_ids if corruption == "zero" else torch.cat([batch.clean_ids, batch.corr_ids])
    both = run_with_cache(model, ids, keep_kv=keep_kv)
    bad = ~torch.isfinite(both.last_logits.float()).all(-1)
    if bad.any():
        B = batch.size
        rows = sorted({int(batch.prompt_idx[i % B]) for i in bad.nonzero().squeeze(-1).tolist()})
        raise NumericalError(
            f"model {model.name} produced NaN/Inf logits on pair(s) {rows[:8]}; "
            + (
                "its weights are corrupt (NaN/Inf values)"
                if model.dtype == torch.float32
                else f"its weights are corrupt or {model.dtype} overflows (try --dtype float32)"
            )
        )
    if corruption == "zero":
        return both, None
    B = batch.size
    kv = None if both.kv is None else [(k[:B], v[:B]) for k, v in both.kv]
    clean = ForwardCache(both.resid_mid[:, :B], both.mlp_out[:, :B], both.last_logits[:B], kv)
    corr = ForwardCache(both.resid_mid[:, B:], both.mlp_out[:, B:], both.last_logits[B:])
    return clean, corr
