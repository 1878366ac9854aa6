"""Every nnsight trace pie_lib runs. Each takes the model's ``remote`` setting.

The traces exchange only dense ``d_model`` tensors with the model (residual streams in, offsets
in, gradients and last-token logits out); CLT encoding and decoding happen outside the trace, on
the caller's device. That keeps remote (NDIF) runs possible without shipping CLT weights, except
for :func:`spliced_last_logits`, which runs the CLT inside the forward by design.

Shapes: L layers, B batch (prompts or patch variants, all of one token length T), D d_model,
V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable, Literal

import nnsight
import torch
from jaxtyping import Float, Int
from torch import Tensor

from pie_lib.engine import remote as remote_
from pie_lib.engine.rules import detach_leading, frozen_norm, half_rule, identity_rule, subtract_rows
from pie_lib.errors import SettingError
from pie_lib.models.arch import get_path
from pie_lib.models.loading import LoadedModel
from pie_lib.models.native.common import (
    MIN_MATMUL_ROWS,
    SDPA_BLOCKED_KEYS,
    SDPA_QUERY_BLOCK,
    SDPA_SMALL_BLOCK,
    exact_final_rows,
)

if TYPE_CHECKING:
    from pie_lib.clt.transcoder import CrossLayerTranscoder

MetricKind = Literal["logit_diff", "logsumexp"]
GradientMode = Literal["replacement", "full", "relp"]


@dataclass
class ForwardCache:
    """What one clean (or corrupted) forward leaves behind.

    Attributes:
        resid_mid: ``[L, B, T, D]`` CLT inputs (hook_resid_mid).
        mlp_out: ``[L, B, T, D]`` real MLP outputs (hook_mlp_out).
        last_logits: ``[B, V]`` logits at the last position.
        kv: per layer the attention ``(keys, values)``, each ``[B, H_kv, T, d_head]``, when the
            forward was asked to keep them (``run_with_cache(..., keep_kv=True)``, local only).
    """

    resid_mid: Float[Tensor, "L B T D"]
    mlp_out: Float[Tensor, "L B T D"]
    last_logits: Float[Tensor, "B V"]
    kv: list[tuple[Tensor, Tensor]] | None = None


def _val(x: Any) -> torch.Tensor:
    """nnsight may hand back a saved proxy or the tensor itself, depending on version/backend."""
    return x.value if hasattr(x, "value") and not isinstance(x, torch.Tensor) else x


def _walk_layers(model: LoadedModel, actions: dict[str, Callable[[int, Any], None]]) -> None:
    """Call ``actions[rel_path](layer, envoy)`` for every layer, in forward order (local traces only:
    the actions are pie_lib closures, which a remote server cannot unpickle)."""
    for layer, rel, env in _forward_steps(model, actions):
        actions[rel](layer, env)


def _forward_steps(model: LoadedModel, rels: Any) -> list[tuple[int, str, Any]]:
    """``(layer, rel_path, envoy)`` for every layer and every path in ``rels``, in forward order.

    Built outside a trace; engine blocks loop over it, so they read envoys and strings only
    (nnsight requires modules to be touched in the order the forward reaches them).
    """
    return [
        (layer, rel, model.envoy(layer, rel))
        for layer in range(model.n_layers)
        for rel in model.arch.layer_order
        if rel in rels
    ]


def _logits(model: LoadedModel) -> Any:
    out = model.lm.output
    return out.logits if hasattr(out, "logits") else out[0]


def _last_only(model: LoadedModel) -> dict[str, int]:
    """Ask HF to project only the last position onto the vocabulary (big vocabularies, soft-caps)."""
    return {"logits_to_keep": 1} if model.arch.supports_logits_to_keep else {}


def run_with_cache(model: LoadedModel, input_ids: torch.Tensor, keep_kv: bool = False) -> ForwardCache:
    """One forward of ``input_ids`` ``[B, T]`` saving resid_mid, mlp_out and last-token logits.

    The per-layer reads are stacked inside the block into names bound there, so they come back
    from a remote server too. ``keep_kv`` also keeps every layer's keys and values (local runs
    only: they would travel back with the request), what :func:`prefix_cache_of` reads.
    """
    arch = model.arch
    if arch.mlp_out == arch.resid_mid:  # pragma: no cover - no such architecture today
        raise AssertionError("resid_mid and mlp_out must be different modules")
    if keep_kv and remote_.is_remote(model):
        raise SettingError("keys and values are kept by local forwards only (they would travel with every request)")
    steps = [(rel == arch.resid_mid, env) for _, rel, env in _forward_steps(model, (arch.resid_mid, arch.mlp_out))]
    lm = model.lm
    name = _cache_kwarg(model) if keep_kv else ""
    kw = {"use_cache": True, **_last_only(model)} if keep_kv else _last_only(model)
    with torch.no_grad(), remote_.trace(model, remote_.host(model, input_ids), kind="cache", **kw):
        reads_in, reads_out = [], []
        for is_input, env in steps:
            if is_input:
                reads_in.append(env.input)
            else:
                reads_out.append(env.output)
        resid_mid = nnsight.save(torch.stack(reads_in))
        mlp_out = nnsight.save(torch.stack(reads_out))
        out = lm.output
        last_logits = nnsight.save((out.logits if hasattr(out, "logits") else out[0])[:, -1])
        if keep_kv:
            cache = nnsight.save(getattr(out, name))
    kv = None
    if keep_kv:
        saved: Any = _val(cache)  # pyright: ignore[reportPossiblyUnboundVariable]  # bound in the block when keep_kv
        kv = [(layer.keys, layer.values) for layer in saved.layers]  # a transformers Cache or a native KVCache
    return ForwardCache(resid_mid=_val(resid_mid), mlp_out=_val(mlp_out), last_logits=_val(last_logits), kv=kv)


def metric_value(logits: torch.Tensor, correct: torch.Tensor, wrong: torch.Tensor, kind: MetricKind) -> torch.Tensor:
    """Per-prompt metric ``[B]`` from logits ``[B, T, V]`` (or last-token ``[B, V]`` for logit_diff).

    logit_diff: ``logit[-1, correct] - logit[-1, wrong]``;
    logsumexp: sum over positions of ``logsumexp(logits[t])`` (the reference script's default flag).
    """
    if kind == "logit_diff":
        last = logits[:, -1] if logits.dim() == 3 else logits
        idx = torch.arange(last.shape[0], device=last.device)
        return last[idx, correct.to(last.device)] - last[idx, wrong.to(last.device)]
    if kind == "logsumexp":
        if logits.dim() != 3:
            raise ValueError("the logsumexp metric needs logits at every position [B, T, V]")
        return torch.logsumexp(logits.float(), dim=-1).sum(-1)
    raise ValueError(f"unknown metric {kind!r}; use 'logit_diff' or 'logsumexp'")


def mlp_out_gradients(
    model: LoadedModel,
    input_ids: torch.Tensor,
    correct: torch.Tensor,
    wrong: torch.Tensor,
    metric: MetricKind = "logit_diff",
    mode: GradientMode = "replacement",
    mlp_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient of the metric w.r.t. every layer's MLP output, in one forward/backward.

    Modes (spec §2.5, §6):
      - ``replacement``: attention patterns frozen (Q/K detached), norm scales frozen, MLP outputs
        are leaves (no gradient through any MLP);
      - ``full``: the true model gradient;
      - ``relp``: CLT-RelP's relevance: patterns and norm scales frozen as above, MLPs traversed with
        the LRP identity rule on the activation and the half rule on the gated product.

    Every MLP output is marked ``requires_grad`` inside the block (a server's weights have
    ``requires_grad=False``, so nothing upstream of the first one carries a graph there); the
    gradient w.r.t. a tensor does not depend on whether its inputs carry one.

    Args:
        input_ids: ``[B, T]`` clean prompts; correct, wrong: ``[B]`` target token ids.
        mlp_out: ``[L, B, T, D]`` the MLP outputs of a forward of these prompts that rounds as this
            one (a local CPU clean cache): in ``replacement`` mode, where every MLP output is
            replaced by a leaf of its own value, the MLPs then do not run and the leaves hold these,
            nor do the norms in front of them (``resid_mid``'s module), whose outputs only the MLPs
            read (local runs only; ignored in the other modes, which differentiate through the MLPs).
    Returns:
        (grads ``[L, B, T, D]``, metric ``[B]``). Prompts in a batch do not interact, so the
        gradient of the summed metric gives each prompt its own gradient.
    """
    if metric not in ("logit_diff", "logsumexp"):
        raise ValueError(f"unknown metric {metric!r}; use 'logit_diff' or 'logsumexp'")
    arch = model.arch
    freeze = mode in ("replacement", "relp")
    replacement = mode == "replacement"
    norm_kind = arch.norm_kind
    # given MLP outputs replace whole MLP modules (nothing else of the plan reads inside them)
    given = (
        mlp_out is not None
        and replacement
        and not remote_.is_remote(model)
        and arch.mlp_out == arch.mlp
        and arch.mlp_out not in arch.norms
    )
    if given and mlp_out is not None and mlp_out.shape[:3] != (model.n_layers, *input_ids.shape):
        raise ValueError(
            f"mlp_out {tuple(mlp_out.shape)} does not match {model.n_layers} layers x {tuple(input_ids.shape)}"
        )

    def norm_op(env: Any) -> tuple:
        mod = env._module if hasattr(env, "_module") else None
        eps = float(getattr(mod, "variance_epsilon", getattr(mod, "eps", 1e-5)))
        return ("norm", env, eps, getattr(mod, "weight", None) is not None)

    # the plan: plain tuples of (op, envoy, values...), in forward order, read by the block below
    plan: list[tuple] = []
    pattern = {p.path: p.fraction for p in arch.pattern_inputs}
    rels = set(arch.layer_order)
    for layer, rel, env in _forward_steps(model, rels):
        if given and rel == arch.resid_mid and rel in arch.norms:
            # the norm in front of a skipped MLP: its output is read by nothing, so it does not run
            plan.append(("unread", env))
            continue
        if freeze and rel in arch.norms:
            plan.append(norm_op(env))
        if freeze and rel in pattern:
            plan.append(("pattern", env, pattern[rel]))
        if mode == "relp" and rel == arch.mlp:
            if arch.mlp_kind == "gated":
                plan.append(
                    (
                        "relp_gated",
                        env,
                        get_path(env, arch.mlp_in[0]),
                        get_path(env, arch.mlp_act),
                        get_path(env, arch.mlp_in[1]),
                        get_path(env, arch.mlp_down),
                    )
                )
            else:
                plan.append(("relp_plain", env, get_path(env, arch.mlp_act)))
        if rel == arch.mlp_out:
            plan.append(("given", env, layer) if given else ("out", env))
    final = norm_op(get_path(model.lm, arch.final_norm)) if freeze else None
    lm = model.lm
    correct, wrong = remote_.host(model, correct), remote_.host(model, wrong)
    keep = _last_only(model) if metric == "logit_diff" else {}
    with torch.enable_grad(), remote_.trace(model, remote_.host(model, input_ids), kind="gradient", **keep):
        leaves = []
        for op in plan:
            env = op[1]
            if op[0] == "unread":
                env.skip(env.input)
            elif op[0] == "norm":
                env.output = frozen_norm(norm_kind, env.input, env.output, env._module.weight if op[3] else None, op[2])
            elif op[0] == "pattern":
                env.output = detach_leading(env.output, op[2])
            elif op[0] == "relp_gated":
                z = op[2].output
                op[3].output = identity_rule(z, op[3].output)
                a = op[3].output
                u = op[4].output
                op[5].input = half_rule(a, u)
            elif op[0] == "relp_plain":
                op[2].output = identity_rule(op[2].input, op[2].output)
            elif op[0] == "given":
                leaf = mlp_out[op[2]].clone().requires_grad_(True)  # pyright: ignore[reportOptionalSubscript]
                env.skip(leaf)
                leaves.append(leaf)
            elif replacement:
                leaf = env.output.detach().requires_grad_(True)
                env.output = leaf
                leaves.append(leaf)
            else:
                leaf = env.output
                if not leaf.requires_grad:
                    leaf.requires_grad_(True)
                leaves.append(leaf)
        if final is not None:
            fn = final[1]
            fn.output = frozen_norm(norm_kind, fn.input, fn.output, fn._module.weight if final[3] else None, final[2])
        out = lm.output
        logits = out.logits if hasattr(out, "logits") else out[0]
        if metric == "logit_diff":
            last = logits[:, -1]
            rows = torch.arange(last.shape[0], device=last.device)
            m = last[rows, correct.to(last.device)] - last[rows, wrong.to(last.device)]
        else:
            m = torch.logsumexp(logits.float(), dim=-1).sum(-1)
        m_saved = nnsight.save(m.detach())
        with m.sum().backward():  # pyright: ignore[reportOptionalContextManager]  # nnsight: a context in a trace
            grads_rev = [leaf.grad for leaf in reversed(leaves)]  # nnsight wants .grad in reverse forward order
            grads = nnsight.save(torch.stack(grads_rev[::-1]))
    return _val(grads), _val(m_saved)


def _patch_steps(model: LoadedModel) -> list[Any]:
    """The ``mlp_out`` envoy of every layer, in order."""
    return [env for _, _, env in _forward_steps(model, (model.arch.mlp_out,))]


@dataclass
class PrefixCache:
    """The clean runs' attention keys and values, so a patched forward can start mid-prompt.

    A patch that changes nothing before position ``t`` leaves every position ``< t`` exactly as in
    the clean run (the model is causal), so its forward only has to run positions ``t..T-1``
    against the clean keys and values of ``0..t-1`` (:func:`patched_last_logits` with ``prefix``).

    Likewise a patch that changes no MLP output before layer ``l`` leaves every layer ``< l`` and
    the attention of layer ``l`` as in the clean run, so decoder layer ``l``'s output is the clean
    residual plus its patched MLP output, and the forward skips layers ``0..l``.

    Attributes:
        kv: per layer ``(keys, values)``, each ``[B, H_kv, T, d_head]`` (the model's own cache
            layout); B the clean prompts.
        resid: ``[L, B, T, D]`` each decoder layer's residual stream before its MLP is added (the
            input of ``resid_mid``); mlp_out: ``[L, B, T, D]`` the clean MLP outputs.
        precision: the model's parameter dtypes when it was built (a float32 upcast or a
            mixed-precision block needs its own cache).
    """

    kv: list[tuple[torch.Tensor, torch.Tensor]]
    resid: torch.Tensor
    mlp_out: torch.Tensor
    precision: tuple[torch.dtype, ...]

    @property
    def seq_len(self) -> int:
        return int(self.kv[0][0].shape[-2])


@dataclass
class PatchedStates:
    """Keys and values of earlier *patched* forwards, so a later one that agrees with one of them up
    to position ``t`` can start at ``t`` from its keys and values instead of the clean run's.

    A patched forward is causal too: a variant whose removals agree with an earlier variant's at every
    position before ``t`` sees, at those positions, exactly that variant's keys and values.

    Attributes:
        kv: per layer ``(keys, values)``, each ``[P, H_kv, T, d_head]``: every position of the P
            earlier forwards (positions a forward did not run hold the clean run's, which they equal).
        precision: the parameter dtypes they were computed in (:func:`parameter_precision`).
    """

    kv: list[tuple[torch.Tensor, torch.Tensor]]
    precision: tuple[torch.dtype, ...]

    @property
    def n(self) -> int:
        return int(self.kv[0][0].shape[0]) if self.kv else 0


@dataclass
class Prefix:
    """Which prefix a patched forward starts from: batch rows ``rows`` ``[V]`` of ``cache``,
    positions ``0..start-1``, and decoder layers ``0..layer`` (offsets are zero below ``layer``).

    With ``states``, sequence ``v`` whose ``state_rows[v] >= 0`` takes the keys and values of
    positions ``0..start-1`` from that row of ``states`` instead (its residual stream at decoder
    layer ``layer``, from position ``start`` on, is still the clean one: the caller's guarantee that
    nothing of it changes below that layer)."""

    cache: PrefixCache
    rows: torch.Tensor
    start: int
    layer: int = 0
    states: PatchedStates | None = None
    state_rows: torch.Tensor | None = None


@dataclass
class SparseOffsets:
    """Patch offsets ``[L, B, P, D]`` that are zero but at a few (sequence, position) rows per layer.

    Layer ``l`` subtracts ``rows[l][r]`` at flat row ``idx[l][r] = b * P + t`` of its MLP output
    ``[B, P, D]`` and nothing elsewhere (a layer's indices are distinct). Subtracting them with
    :func:`~pie_lib.engine.rules.subtract_rows` gives bitwise what subtracting :meth:`dense` gives
    (``x - 0`` is ``x``): single and pair removals change 1-2 rows of a layer, so the dense tensor
    would be almost all zeros to build, move and subtract.

    Attributes:
        idx: per layer ``[R_l]`` int64 flat rows; rows: per layer ``[R_l, D]`` what to subtract there.
        batch: B sequences; positions: P positions each; dim: D.
    """

    idx: list[Int[Tensor, " R"]]
    rows: list[Float[Tensor, "R D"]]
    batch: int
    positions: int
    dim: int

    @property
    def n_layers(self) -> int:
        return len(self.idx)

    def dense(self) -> Float[Tensor, "L B P D"]:
        """The same offsets as one dense tensor."""
        dev = self.rows[0].device if self.rows else torch.device("cpu")
        dtype = self.rows[0].dtype if self.rows else torch.float32
        out = torch.zeros(self.n_layers, self.batch * self.positions, self.dim, device=dev, dtype=dtype)
        for layer, (idx, rows) in enumerate(zip(self.idx, self.rows)):
            out[layer, idx.to(dev)] = rows.to(dtype)
        return out.view(self.n_layers, self.batch, self.positions, self.dim)

    def take(self, seqs: Int[Tensor, " B2"]) -> SparseOffsets:
        """The offsets of sequences ``seqs`` (repeats allowed), renumbered ``0..B2-1`` in that order."""
        P = self.positions
        seqs = seqs.to(torch.long)
        idx_out, rows_out = [], []
        for idx, rows in zip(self.idx, self.rows):
            seq = idx // P
            order = torch.argsort(seq, stable=True)
            counts = torch.bincount(seq, minlength=self.batch)
            starts = torch.cumsum(counts, 0) - counts
            n = counts[seqs.to(counts.device)]  # [B2] rows of each new sequence
            new_seq = torch.repeat_interleave(torch.arange(seqs.numel(), device=n.device), n)
            within = torch.arange(int(n.sum()), device=n.device) - torch.repeat_interleave(torch.cumsum(n, 0) - n, n)
            src = order[starts[seqs.to(counts.device)].repeat_interleave(n) + within]
            idx_out.append(new_seq * P + idx[src] % P)
            rows_out.append(rows[src.to(rows.device)])
        return SparseOffsets(idx_out, rows_out, int(seqs.numel()), P, self.dim)

    def layer_rows(self, layer: int, last: int = 0) -> tuple[Int[Tensor, " R"], Float[Tensor, "R D"]]:
        """Layer ``layer``'s ``(idx, rows)``; ``last`` > 0: for an MLP output of only the last ``last``
        positions (``[B, last, D]``: ``final_block_positions``), the rows there, their indices renumbered."""
        idx, rows = self.idx[layer], self.rows[layer]
        if not last:
            return idx, rows
        P = self.positions
        t = idx % P - (P - last)
        keep = (t >= 0).nonzero().squeeze(-1)
        return (idx[keep] // P) * last + t[keep], rows[keep.to(rows.device)]


def parameter_precision(model: LoadedModel) -> tuple[torch.dtype, ...]:
    """The dtypes of the model's parameters, in order (what a :class:`PrefixCache` is valid for).

    The parameter objects are listed once per model (a float32 upcast or a mixed-precision block
    changes their ``.data``, not the objects), so this is cheap enough to check every forward.
    """
    params = model.extra.get("parameters")
    if params is None:
        params = model.extra["parameters"] = list(model.hf.parameters())
    if model.extra.get("float32_forwards"):  # engine.precision's per-module upcast: weights rest in bf16
        return tuple(torch.float32 if p.is_floating_point() else p.dtype for p in params)
    return tuple(p.dtype for p in params)


def prefix_cache_keeps_every_key(model: LoadedModel, seq_len: int) -> bool:
    """Whether a clean run's key-value cache of ``seq_len`` positions holds every position's keys.

    transformers' cache keeps only the last ``sliding_window`` keys of a sliding-window layer
    (Gemma-2), so on the hf backend a prompt longer than the window cannot restart from it; the
    native cache keeps every key.
    """
    if model.backend != "hf":
        return True
    window = getattr(model.config, "sliding_window", None)
    return window is None or seq_len <= int(window)


def clean_prefix_cache(model: LoadedModel, input_ids: torch.Tensor) -> PrefixCache:
    """One clean forward of ``input_ids`` ``[B, T]`` keeping every layer's keys and values (local only:
    the cache would have to travel to and from the server with every request)."""
    if remote_.is_remote(model):
        raise SettingError("prefix caches are local-only (keys and values would travel with every request)")
    if not prefix_cache_keeps_every_key(model, input_ids.shape[1]):
        raise SettingError(
            f"a {input_ids.shape[1]}-token prompt is longer than the model's sliding window, whose transformers "
            "cache drops the oldest keys; run it without prefix reuse or load the model with backend='native'"
        )
    return prefix_cache_of(model, run_with_cache(model, input_ids, keep_kv=True))


def prefix_cache_of(model: LoadedModel, cache: ForwardCache, copy: bool = False) -> PrefixCache:
    """The :class:`PrefixCache` of a clean forward run with ``keep_kv`` (in the model's current precision).

    ``copy``: copy the tensors out (when ``cache`` holds views into a larger batch's, e.g. the clean
    half of :func:`pie_lib.prune.occurrences.run_pair_caches`, so the rest can be freed). The
    prefix forwards read it by indexing, so the values alone matter, not the strides.
    """
    if cache.kv is None:
        raise ValueError("this forward kept no keys and values; run it with keep_kv=True")
    own = (lambda t: t.clone()) if copy else (lambda t: t)
    return PrefixCache(
        [(own(k), own(v)) for k, v in cache.kv], own(cache.resid_mid), own(cache.mlp_out), parameter_precision(model)
    )


def _cache_kwarg(model: LoadedModel) -> str:
    """What the model's forward calls its key-value cache: ``cache`` (transformers >= 5.2x) or
    ``past_key_values`` (before; still accepted, with a deprecation warning, after)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.hf.forward).parameters else "past_key_values"


def exact_suffix_start(seq_len: int, first_changed: int, pads_short_blocks: bool = False, sequences: int = 1) -> int:
    """The latest start ``<= first_changed`` whose suffix forward rounds exactly as the full forward.

    Every per-position op (matmuls, norms, MLPs) gives a row the same bits whatever the other rows,
    and so does SDPA's attention as long as each query row sits in a block of the same kind (at
    least :data:`SDPA_SMALL_BLOCK` rows) in both forwards (measured on torch's CPU kernel;
    ``tests/test_patch_batching.py`` checks it). A full forward's query blocks start at 0, a
    suffix's at its start, so the suffix is extended until its last block has at least
    :data:`SDPA_SMALL_BLOCK` rows. A prompt whose own last block is shorter (T mod 32 in 1..3) and
    prompts of 192 tokens or more (another block size) always start at 0: no suffix of theirs
    was measured to round alike.

    A native model whose attention pads such a tail block itself
    (:func:`pie_lib.models.native.common.short_block_padding`; ``LoadedModel.pads_short_query_blocks``)
    starts at the first changed position, unless the forward would then have fewer than
    :data:`~pie_lib.models.native.common.MIN_MATMUL_ROWS` rows (``sequences x positions``): torch's
    CPU matmul computes 1-3 rows along another path (measured), so it starts early enough for 4.

    Args:
        seq_len: T; first_changed: the first position whose input differs from the clean run
            (``T`` or more: nothing differs; the last position still runs, for its logits).
        pads_short_blocks: the model pads 1-3-row tail query blocks of cached suffixes.
        sequences: how many sequences the forward holds (with ``pads_short_blocks``).
    """
    T, Q, small = seq_len, SDPA_QUERY_BLOCK, SDPA_SMALL_BLOCK
    if T >= SDPA_BLOCKED_KEYS or 0 < T % Q < small:
        return 0
    start = max(0, min(first_changed, T - 1))
    if pads_short_blocks:
        while start > 0 and max(1, sequences) * (T - start) < MIN_MATMUL_ROWS:
            start -= 1
        return start
    while start > 0 and 0 < (T - start) % Q < small:
        start -= 1
    return start


def _final_rows(model: LoadedModel, batch: int, q_len: int) -> int:
    """How many last positions a local native forward's final block computes past its attention
    (the others feed no last logit): :func:`exact_final_rows`; 0 (the whole block) for hf or remote."""
    if model.backend != "native" or remote_.is_remote(model):
        return 0
    return exact_final_rows(batch, q_len)


def patched_last_logits(
    model: LoadedModel,
    input_ids: torch.Tensor,
    offsets: torch.Tensor | SparseOffsets,
    with_logsumexp: bool = False,
    prefix: Prefix | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Real-model forward with fixed additive offsets *subtracted* from every MLP output.

    Removing an occurrence subtracts its delta writes (spec §3); everything downstream is recomputed.

    Args:
        input_ids: ``[B, T]``; offsets: ``[L, B, T, D]`` (what to subtract at each layer), dense or
            :class:`SparseOffsets` (the same bits; a remote forward gets them dense).
        with_logsumexp: also return the logsumexp metric (sum over positions), computed in the
            trace so full ``[B, T, V]`` logits never leave it.
        prefix: local only: start at ``prefix.start`` from the clean keys and values of
            ``prefix.rows`` (:class:`PrefixCache`), after decoder layer ``prefix.layer``: only
            positions ``start..T-1`` of layers ``> layer`` run, and ``offsets`` is
            ``[L, B, T - start, D]``, the offsets of those positions. No offset may be nonzero
            before ``start`` or below ``layer`` (the caller's guarantee); with_logsumexp is refused.
    Returns:
        (``[B, V]`` last-token logits, ``[B]`` logsumexp metric or None).
    """
    if prefix is not None:
        return _patched_suffix(model, input_ids, offsets, prefix, with_logsumexp), None
    if isinstance(offsets, SparseOffsets) and remote_.is_remote(model):
        offsets = offsets.dense()  # the server's block subtracts dense offsets
    steps = _patch_steps(model)
    lm = model.lm
    lse = None
    keep: dict[str, Any] = {} if with_logsumexp else _last_only(model)
    final = 0 if with_logsumexp else _final_rows(model, *input_ids.shape)
    if final:  # the last block's MLP output is [B, final, D]
        keep["final_block_positions"] = final
    placed = offsets if isinstance(offsets, SparseOffsets) else remote_.host(model, offsets)
    off, sparse = _layer_offsets(placed, range(model.n_layers), final)
    with torch.no_grad(), remote_.trace(model, remote_.host(model, input_ids), kind="patch", **keep):
        for layer, env in enumerate(steps):
            y = env.output
            if sparse:
                env.output = subtract_rows(y, off[layer][0], off[layer][1])
            else:
                env.output = y - off[layer].to(y.device, y.dtype)
        out = lm.output
        logits = out.logits if hasattr(out, "logits") else out[0]
        last = nnsight.save(logits[:, -1])
        if with_logsumexp:
            lse = nnsight.save(torch.logsumexp(logits.float(), dim=-1).sum(-1))
    return _val(last), (_val(lse) if lse is not None else None)


def patched_suffix_with_states(
    model: LoadedModel,
    input_ids: torch.Tensor,
    offsets: torch.Tensor | SparseOffsets,
    prefix: Prefix,
    keep: torch.Tensor,
    table: PatchedStates,
    at: int,
) -> torch.Tensor:
    """:func:`patched_last_logits` with ``prefix``, also writing the keys and values, at every
    position, of sequences ``keep`` ``[n]`` into rows ``at..at+n-1`` of ``table`` (preallocated, in this
    forward's precision), for later forwards that agree with one of them up to some position.

    Returns:
        ``[B, V]`` last-token logits.
    """
    return _patched_suffix(model, input_ids, offsets, prefix, False, keep_states=(keep, table, at))


def _gather_kv(
    prefix: Prefix, layer: int, upto: int, device: torch.device, length: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[V, H_kv, length, d]`` keys and values of decoder layer ``layer`` whose positions ``0..upto-1``
    hold the clean rows, and for a sequence that starts from an earlier patched forward that forward's
    rows before ``prefix.start``; positions from ``upto`` on are left unset (``length`` > ``upto``: a
    buffer the forward fills). ``length`` defaults to ``upto``."""
    k, v = prefix.cache.kv[layer]
    rows = prefix.rows.to(device)
    length = upto if length is None else length
    kj = k.new_empty((rows.numel(), k.shape[1], length, k.shape[3]))
    vj = v.new_empty((rows.numel(), v.shape[1], length, v.shape[3]))
    # index_select into the slice: one pass, no temporary (advanced indexing copies twice as slowly)
    torch.index_select(k[:, :, :upto], 0, rows, out=kj[:, :, :upto])
    torch.index_select(v[:, :, :upto], 0, rows, out=vj[:, :, :upto])
    if prefix.states is not None and prefix.state_rows is not None and prefix.start > 0:
        sr = prefix.state_rows.to(device)
        sel = (sr >= 0).nonzero().squeeze(-1)
        if sel.numel():
            sk, sv = prefix.states.kv[layer]
            n = min(prefix.start, upto)
            kj[:, :, :n].index_copy_(0, sel, torch.index_select(sk[:, :, :n], 0, sr[sel]).to(kj))
            vj[:, :, :n].index_copy_(0, sel, torch.index_select(sv[:, :, :n], 0, sr[sel]).to(vj))
    return kj, vj


def _prefix_kv(prefix: Prefix, device: torch.device, buffers: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer ``[V, H_kv, start, d]`` keys and values the suffix starts from.

    Layers ``0..prefix.layer`` are skipped (never read): they get a zero-copy view of one clean row,
    expanded, so the cache still knows its length; the others :func:`_gather_kv`. ``buffers``: the
    others are ``[V, H_kv, T, d]`` instead, positions ``0..start-1`` as above and the rest unset,
    for a preallocated cache to fill from ``start`` on (one copy of the prefix, not a gather and
    then a concatenation).
    """
    start, V = prefix.start, prefix.rows.numel()
    out = []
    for j, (k, v) in enumerate(prefix.cache.kv):
        if j <= prefix.layer:
            out.append((k[:1, :, :start].expand(V, -1, -1, -1), v[:1, :, :start].expand(V, -1, -1, -1)))
        else:
            out.append(_gather_kv(prefix, j, start, device, k.shape[-2] if buffers else None))
    return out


def _layer_offsets(offsets: torch.Tensor | SparseOffsets, layers: range, final: int) -> tuple[Any, bool]:
    """Per layer of ``layers`` (indexed from 0) what its MLP output loses: a dense ``[B, P, D]`` offset,
    or a sparse ``(idx, rows)`` pair (:meth:`SparseOffsets.layer_rows`); the model's last layer cut to
    its last ``final`` positions where ``final`` > 0. Returns (those, whether they are sparse)."""
    last = layers.stop - 1
    if isinstance(offsets, SparseOffsets):
        return [offsets.layer_rows(j, final if j == last else 0) for j in layers], True
    if not final:  # one tensor, as a remote request ships it
        return offsets[layers.start : layers.stop], False
    return [offsets[j][:, -final:] if j == last else offsets[j] for j in layers], False


def _patched_suffix(
    model: LoadedModel,
    input_ids: torch.Tensor,
    offsets: torch.Tensor | SparseOffsets,
    prefix: Prefix,
    with_logsumexp: bool,
    keep_states: tuple[torch.Tensor, PatchedStates, int] | None = None,
) -> torch.Tensor:
    """:func:`patched_last_logits` of positions ``prefix.start..T-1`` on top of the prefix, from
    decoder layer ``prefix.layer``'s output on (layers ``0..prefix.layer`` are skipped: their outputs
    below the last are never read, and the last is the clean residual plus its patched MLP output,
    computed as the layer would: ``residual + (mlp_out - offset)``). ``keep_states`` ``(keep, table,
    at)``: also write sequences ``keep``'s keys and values at every position into ``table`` from row
    ``at`` (:func:`patched_suffix_with_states`)."""
    start, T, first = prefix.start, input_ids.shape[1], prefix.layer
    if remote_.is_remote(model):
        raise SettingError("a patched forward from a clean prefix is local-only; run it without prefix")
    if with_logsumexp:
        raise SettingError("the logsumexp metric sums every position; run it without prefix")
    covered = offsets.positions if isinstance(offsets, SparseOffsets) else offsets.shape[2]
    if covered != T - start or prefix.cache.seq_len != T:
        raise ValueError(
            f"prefix start {start}: offsets cover {covered} positions and the cache {prefix.cache.seq_len}; "
            f"expected {T - start} and {T}"
        )
    precision = parameter_precision(model)
    if prefix.cache.precision != precision or (prefix.states is not None and prefix.states.precision != precision):
        raise ValueError("the prefix cache was built with other parameter dtypes; build one for this precision")
    if keep_states is not None and keep_states[1].precision != precision:
        raise ValueError("the state table was built for other parameter dtypes; build one for this precision")
    if not 0 <= first < model.n_layers:
        raise ValueError(f"prefix layer {first}: the model has {model.n_layers} layers")
    rows = prefix.rows.to(model.device)
    kw: dict[str, Any] = {**_last_only(model)}
    name = _cache_kwarg(model)
    if start > 0 or keep_states is not None:
        native = model.backend == "native"
        kw[name] = model.kv_cache(_prefix_kv(prefix, model.device, native), start if native else None)
    if start > 0:
        # the mask covers the cached positions too (nnsight would make one for the new tokens only)
        kw["attention_mask"] = torch.ones(input_ids.shape[0], T, dtype=torch.long, device=model.device)
    resid = prefix.cache.resid[first][rows, start:]
    y = prefix.cache.mlp_out[first][rows, start:]  # advanced indexing: a copy, which subtract_rows may write into
    if isinstance(offsets, SparseOffsets):
        y_patched = subtract_rows(y, *offsets.layer_rows(first))
    else:
        y_patched = y - offsets[first].to(y.device, y.dtype)
    skipped = resid + y_patched  # [V, T - start, D]: decoder layer `first`'s output
    blocks = get_path(model.lm, model.arch.layers)
    skips = [blocks[j] for j in range(first + 1)]
    steps = _patch_steps(model)[first + 1 :]
    final = _final_rows(model, input_ids.shape[0], T - start) if first < model.n_layers - 1 else 0
    if final:  # the last block's MLP output is [V, final, D]
        kw["final_block_positions"] = final
    offs, sparse = _layer_offsets(offsets, range(first + 1, model.n_layers), final)
    lm = model.lm
    cache = None
    with torch.no_grad(), remote_.trace(model, input_ids[:, start:].to(model.device), kind="patch", **kw):
        for block in skips:
            block.skip(skipped)
        for layer, env in enumerate(steps):
            h = env.output
            if sparse:
                env.output = subtract_rows(h, offs[layer][0], offs[layer][1])
            else:
                env.output = h - offs[layer].to(h.device, h.dtype)
        out = lm.output
        last = nnsight.save((out.logits if hasattr(out, "logits") else out[0])[:, -1])
        if keep_states is not None:
            cache = nnsight.save(getattr(out, name))
    if keep_states is not None:
        _write_states(prefix, getattr(_val(cache), "layers"), *keep_states, T, model.device)
    return _val(last)


def _write_states(
    prefix: Prefix, layers: Any, keep: torch.Tensor, table: PatchedStates, at: int, T: int, device: torch.device
) -> None:
    """Rows ``at..at+n-1`` of ``table`` := sequences ``keep`` ``[n]``'s keys and values at every position.

    A skipped layer's are the prefix's before ``start`` and the clean run's from there (nothing
    changes below ``prefix.layer``); a layer that ran holds all of its positions in the cache."""
    keep = keep.to(device)
    rows = slice(at, at + keep.numel())
    sub = replace(
        prefix,
        rows=prefix.rows.to(device)[keep],
        state_rows=prefix.state_rows.to(device)[keep] if prefix.state_rows is not None else None,
    )
    for j, (tk, tv) in enumerate(table.kv):
        if j <= prefix.layer:
            tk[rows], tv[rows] = _gather_kv(sub, j, T, device)
        else:
            torch.index_select(layers[j].keys, 0, keep, out=tk[rows])
            torch.index_select(layers[j].values, 0, keep, out=tv[rows])


def patched_last_logits_many(
    model: LoadedModel,
    jobs: list[tuple[torch.Tensor, torch.Tensor]],
    with_logsumexp: bool = False,
    max_request_bytes: int = 256 << 20,
) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """:func:`patched_last_logits` of many ``(input_ids, offsets)`` jobs, as few requests as possible.

    Remote: the jobs go as one ``model.session`` per ``max_request_bytes`` of offsets (each job
    one trace inside it), instead of one request per job. Local: one trace per job.
    """
    if not remote_.is_remote(model) or not jobs:
        return [patched_last_logits(model, ids, off, with_logsumexp) for ids, off in jobs]
    groups: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[]]
    size = 0
    for ids, off in jobs:
        nbytes = off.numel() * off.element_size()
        if groups[-1] and size + nbytes > max_request_bytes:
            groups.append([])
            size = 0
        groups[-1].append((remote_.host(model, ids), remote_.host(model, off)))
        size += nbytes
    steps = _patch_steps(model)
    lm = model.lm
    keep = {} if with_logsumexp else _last_only(model)
    results: list[tuple[torch.Tensor, torch.Tensor | None]] = []
    for group in groups:
        with torch.no_grad(), remote_.session(model, "patch-session"):  # one request per group
            saved = nnsight.save([])
            for ids, off in group:
                with lm.trace(ids, **keep):
                    for layer, env in enumerate(steps):
                        y = env.output
                        env.output = y - off[layer].to(y.device, y.dtype)
                    out = lm.output
                    logits = out.logits if hasattr(out, "logits") else out[0]
                    if with_logsumexp:
                        saved.append((logits[:, -1], torch.logsumexp(logits.float(), dim=-1).sum(-1)))
                    else:
                        saved.append((logits[:, -1], None))
        results += [(_val(a), None if b is None else _val(b)) for a, b in _val(saved)]
    return results


def spliced_last_logits(
    model: LoadedModel, clt: CrossLayerTranscoder, input_ids: torch.Tensor, error: torch.Tensor
) -> torch.Tensor:
    """Forward with every MLP output replaced by ``CLT reconstruction + error``.

    The CLT encodes the residual stream *of this forward* at each layer (so any change upstream
    propagates through the transcoder); ``error`` ``[L, B, T, D]`` is held fixed. With the error of
    the clean run, the logits equal the model's own (the splice identity).

    Returns:
        ``[B, V]`` last-token logits.
    """
    if remote_.is_remote(model):
        raise SettingError(
            "spliced_last_logits runs the CLT inside the forward and is local-only (the server has no CLT); "
            "run it without --remote"
        )
    arch = model.arch
    L = model.n_layers
    accum: list[torch.Tensor | None] = [None] * L
    error = error.to(model.device)

    def encode(layer: int, env: Any) -> None:
        x = env.input
        acts = clt.encode(x.to(clt.dtype), layer=layer)  # [B, T, F]
        used = (acts != 0).flatten(0, 1).any(0).nonzero().squeeze(-1)
        if used.numel():
            rows = clt.decoder_rows(layer, used)  # [U, n_out, D]
            writes = torch.einsum("btu,usd->sbtd", acts[..., used], rows.to(acts.dtype))
            for j, s in enumerate(clt.targets(layer)):
                prev = accum[s]
                accum[s] = writes[j] if prev is None else prev + writes[j]

    def write(layer: int, env: Any) -> None:
        acc = accum[layer]
        rec = clt.b_dec[layer].to(error.dtype) + (acc if acc is not None else 0)
        env.output = (rec + error[layer]).to(env.output.dtype)

    with torch.no_grad(), remote_.trace(model, input_ids.to(model.device), kind="trace", **_last_only(model)):
        _walk_layers(model, {arch.resid_mid: encode, arch.mlp_out: write})
        last = _logits(model)[:, -1].save()
    return _val(last)
