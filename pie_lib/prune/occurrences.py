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
from pie_lib.models.native.common import MIN_MATMUL_ROWS

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


def matmul_rows(want: torch.Tensor) -> torch.Tensor:
    """The rows to put through a matmul so that each wanted row rounds as in the whole input.

    ``want`` ``[...]`` marks the rows needed out of a whole input of ``want.numel()`` rows. torch's
    CPU matmul rounds a row the same whatever the other rows from ``MIN_MATMUL_ROWS`` rows on, so
    the wanted rows go alone, topped up with the first unwanted ones to that many (none wanted:
    none go); a whole input under that many rows ran on the other path, so then every row goes.

    Returns:
        ``[...]`` bool: ``want`` plus the rows added.
    """
    n_want = int(want.sum())
    n_more = MIN_MATMUL_ROWS - n_want
    if n_more <= 0 or n_want == 0:
        return want
    if want.numel() < MIN_MATMUL_ROWS:
        return torch.ones_like(want)
    flat = want.flatten().clone()
    flat[(~flat).nonzero().squeeze(-1)[:n_more]] = True
    return flat.reshape(want.shape)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``[..., D]`` x2 -> ``[...]``: whether the two vectors are bit for bit the same."""
    as_int = {8: torch.int64, 4: torch.int32, 2: torch.int16}[a.element_size()]
    return (a.view(as_int) == b.view(as_int)).all(-1)


def _encoded_keys(
    clt: CrossLayerTranscoder, x: Float[Tensor, "B T D"], layer: int, want: torch.Tensor
) -> tuple[Int[Tensor, " A"], Float[Tensor, " A"]]:
    """Flat keys ``((b * L + layer) * T + t) * F + f`` and values of the nonzero activations at the
    positions ``want`` ``[B, T]`` (only those rows are encoded, :func:`matmul_rows`)."""
    L, F = clt.n_layers, clt.n_features
    T = x.shape[1]
    rows = matmul_rows(want)
    pos = rows.nonzero()  # [n, 2] (b, t), row-major like x[rows]
    idx, v = clt.active_entries(x[rows].to(clt.device), layer)  # idx [A, 2] (row, f)
    b, t = pos[idx[:, 0], 0].to(idx.device), pos[idx[:, 0], 1].to(idx.device)
    needed = want.to(idx.device)[b, t]  # drop the rows only added to keep the matmul's rounding
    key = ((b * L + layer) * T + t) * F + idx[:, 1]
    return key[needed], v[needed]


def active_occurrences(
    clt: CrossLayerTranscoder,
    clean: ForwardCache,
    corr: ForwardCache | None,
    zero_bos: bool = True,
) -> Occurrences:
    """Encode both runs and take the union of active occurrences.

    Each layer is encoded and read sparsely on its own (:meth:`CrossLayerTranscoder.active_entries`;
    no dense ``[L, B, T, F]`` stack), and only the rows whose activations can differ: BOS (zeroed)
    is not encoded, nor a corrupted position whose residual stream is bit for bit the clean one
    (a prefix the two prompts share), whose activations are the clean ones. Every other row is
    encoded alone, with the bits it has in a whole-batch encode (:func:`matmul_rows`). The keys
    ``(b, l, t, f)`` are sorted by the union below, so the order they are gathered in does not matter.

    Args:
        clean, corr: caches with ``resid_mid`` ``[L, B, T, D]``; ``corr`` None = zero corruption
            (the active set is the clean one, a_corr = 0).
        zero_bos: zero position 0 (BOS) activations, as the reference does.
    """
    L, B, T, _ = clean.resid_mid.shape
    F = clt.n_features
    device = clean.resid_mid.device
    want = torch.ones(B, T, dtype=torch.bool, device=device)
    if zero_bos:
        want[:, 0] = False
    keys_c, vals_c, keys_o, vals_o, shared = [], [], [], [], []
    for layer in range(L):
        xc = clean.resid_mid[layer]  # [B, T, D]
        key, v = _encoded_keys(clt, xc, layer, want)
        keys_c.append(key)
        vals_c.append(v)
        if corr is None:
            continue
        xo = corr.resid_mid[layer]
        same = _same_bits(xo, xc)  # [B, T]: the corrupted row is the clean one
        key_o, v_o = _encoded_keys(clt, xo, layer, want & ~same)
        keys_o.append(key_o)
        vals_o.append(v_o)
        t = (key // F) % T
        b = key // (F * T * L)
        shared.append(same.to(key.device)[b, t])  # [A_c]: clean entries the corrupted run shares
    key_c, v_c = torch.cat(keys_c), torch.cat(vals_c)
    key_o = torch.cat(keys_o) if keys_o else key_c[:0]
    uniq, inv = torch.unique(torch.cat([key_c, key_o]), return_inverse=True)  # sorted => (b, l, t, f) order
    n_c = key_c.numel()
    a_c = torch.zeros(uniq.numel(), dtype=clt.dtype, device=uniq.device)
    a_o = torch.zeros_like(a_c)
    a_c[inv[:n_c]] = v_c  # each key at most once per side: 0 + v, as an accumulation would give
    if keys_o:
        a_o[inv[n_c:]] = torch.cat(vals_o)
        same_c = torch.cat(shared)
        a_o[inv[:n_c][same_c]] = v_c[same_c]
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
