"""Prune-stage speed: pie_lib (vectorised, batched) against a per-occurrence / per-forward loop.

What is timed, per prompt (median over repeats, after a warm-up pass):

- ``setup``     clean + corrupted forwards, CLT encoding, active set, decoder rows (BatchContext)
- ``grad``      the replacement gradient (and CLT-RelP's relevance when clt-relp is a method)
- ``fap``       FAP scores from that gradient
- ``synergy``   FAP-Synergy at one budget (``--syn-k``, default 50)
- ``select[m]`` selections of method m at every budget of the K ladder (Synergy runs forwards here)
- ``evaluate``  circuit / complement / null forwards of every (method, K) of the ladder

The naive reference (``benchmarks/naive_reference.py``) reuses the setup and the gradients, so
its rows isolate vectorisation and batching. Its selections and KLs must equal pie_lib's: the run
fails (exit 1) when they do not.

World: the toy world when ``pie_lib/toy/assets/llama`` exists, else a synthetic one of the toy's
shapes (random 4-layer Llama, d_model 96, 512 CLT features per layer, JumpReLU thresholds set so
~``--active-per-token`` features fire per token, a word tokenizer over the IOI vocabulary), built
once under ``--cache``. ``--model/--clt`` run any local model and CLT.

Example::

    python benchmarks/prune_speed.py --n 8 --json bench.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from naive_reference import NaiveReference  # noqa: E402

from pie_lib.clt import load_clt, save_clt  # noqa: E402
from pie_lib.engine.traces import run_with_cache  # noqa: E402
from pie_lib.models.loading import LoadedModel, load_model  # noqa: E402
from pie_lib.prune.context import BatchContext, ScoringConfig  # noqa: E402
from pie_lib.prune.occurrences import PairBatch, tokenize_pairs  # noqa: E402
from pie_lib.prune.params import MethodParams  # noqa: E402
from pie_lib.prune.registry import get_methods  # noqa: E402
from pie_lib.prune.retention import evaluate_keep_masks  # noqa: E402
from pie_lib.prune.scores import fap_scores  # noqa: E402
from pie_lib.prune.select import SynergyConfig, synergy_rerank  # noqa: E402

DEFAULT_METHODS = ("fap", "fap-synergy", "clt-relp", "act-mag", "random")
DEFAULT_LADDER = (50, 75, 100, 200, 400, 800)
NAIVE_METHODS = set(DEFAULT_METHODS)


# ============================================================================ measurement
def sync(device: torch.device | str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


class PeakMemory:
    """Peak memory of one phase: GPU ``max_memory_allocated``; CPU peak RSS (VmHWM, reset per phase).

    On CPU the peak is reset through ``/proc/self/clear_refs`` (Linux); where that is refused it
    falls back to ``resource.getrusage`` maxrss (whole-process peak, never reset). tracemalloc is
    not used: torch's CPU tensors bypass Python's allocator, so it would miss them.
    """

    def __init__(self, device: torch.device | str) -> None:
        self.cuda = str(device).startswith("cuda")
        self.can_reset = False
        if not self.cuda:
            try:
                with open("/proc/self/clear_refs", "w") as fh:
                    fh.write("5")
                self.can_reset = True
            except OSError:
                pass
        self.kind = (
            "cuda max_memory_allocated"
            if self.cuda
            else ("peak RSS (VmHWM, reset per phase)" if self.can_reset else "ru_maxrss (process peak)")
        )

    def reset(self) -> float:
        """Reset the peak; returns the current level (MB) it starts from."""
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            return torch.cuda.memory_allocated() / 2**20
        if self.can_reset:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
        return self.peak_mb()

    def peak_mb(self) -> float:
        if self.cuda:
            return torch.cuda.max_memory_allocated() / 2**20
        if self.can_reset:
            for line in open("/proc/self/status"):
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass
class PhaseLog:
    """Seconds and peak memory per phase name, accumulated over the batches of one pass."""

    seconds: dict[str, float] = field(default_factory=dict)
    peak_mb: dict[str, float] = field(default_factory=dict)
    growth_mb: dict[str, float] = field(default_factory=dict)  # peak minus the level at phase start

    @contextlib.contextmanager
    def phase(self, name: str, device: torch.device | str, mem: PeakMemory) -> Iterator[None]:
        sync(device)
        start = mem.reset()
        t0 = time.perf_counter()
        yield
        sync(device)
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
        peak = mem.peak_mb()
        self.peak_mb[name] = max(self.peak_mb.get(name, 0.0), peak)
        self.growth_mb[name] = max(self.growth_mb.get(name, 0.0), peak - start)


# ============================================================================ profiling
#: (module or class, attribute, label): the pie_lib steps the profile attributes time to.
def _profile_targets() -> list[tuple[Any, str, str]]:
    import pie_lib.prune.context as context_mod
    import pie_lib.prune.occurrences as occ_mod
    import pie_lib.prune.patching as patching_mod
    import pie_lib.prune.scores as scores_mod
    from pie_lib.clt.transcoder import CrossLayerTranscoder

    return [
        (occ_mod, "run_with_cache", "caches: clean+corrupted forwards"),
        (CrossLayerTranscoder, "encode", "CLT encode"),
        (context_mod, "gather_rows", "decoder rows"),
        (context_mod, "mlp_out_gradients", "gradients (fwd+bwd traces)"),
        (scores_mod, "project_gradients", "score projection"),
        (patching_mod.PatchEvaluator, "_offsets", "patch offsets"),
        (patching_mod, "patched_last_logits", "patch forwards (traces)"),
        (patching_mod.PatchEvaluator, "run", "PatchEvaluator.run (total)"),
    ]


@dataclass
class Instrument:
    """Wall time, calls and rows (batch sizes of patch forwards) per instrumented pie_lib step."""

    seconds: dict[str, float] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)


@contextlib.contextmanager
def instrument(device: torch.device | str) -> Iterator[Instrument]:
    """Wrap pie_lib's steps (restored on exit) to time them, labelled for ``torch.profiler`` too.

    Wrappers synchronise the GPU so each step owns its kernels' time.
    """
    rec = Instrument()
    saved = []
    for owner, attr, label in _profile_targets():
        orig = getattr(owner, attr)
        saved.append((owner, attr, orig))

        def wrapper(*a: Any, __orig: Callable = orig, __label: str = label, **kw: Any) -> Any:
            sync(device)
            t0 = time.perf_counter()
            with torch.profiler.record_function(__label):
                out = __orig(*a, **kw)
            sync(device)
            rec.seconds[__label] = rec.seconds.get(__label, 0.0) + time.perf_counter() - t0
            rec.calls[__label] = rec.calls.get(__label, 0) + 1
            if __label.startswith("patch forwards"):
                rec.rows[__label] = rec.rows.get(__label, 0) + int(a[1].shape[0])
            return out

        setattr(owner, attr, wrapper)
    try:
        yield rec
    finally:
        for owner, attr, orig in reversed(saved):
            setattr(owner, attr, orig)


def trace_overhead(model: LoadedModel, batch: PairBatch, rows: int, repeats: int = 5) -> dict[str, float]:
    """Seconds of one nnsight patch trace vs the plain ``transformers`` forward of the same input."""
    from pie_lib.engine.traces import patched_last_logits

    ids = batch.clean_ids[:1].repeat(rows, 1).to(model.device)
    off = torch.zeros(model.n_layers, rows, ids.shape[1], model.d_model, device=model.device, dtype=model.dtype)
    t_trace, t_plain = [], []
    for _ in range(repeats + 1):
        sync(model.device)
        t0 = time.perf_counter()
        patched_last_logits(model, ids, off)
        sync(model.device)
        t1 = time.perf_counter()
        with torch.no_grad():
            model.hf(ids)
        sync(model.device)
        t_trace.append(t1 - t0)
        t_plain.append(time.perf_counter() - t1)
    tr, pl = statistics.median(t_trace[1:]), statistics.median(t_plain[1:])
    return {"rows": rows, "trace_s": tr, "plain_s": pl, "overhead_s": tr - pl}


def format_profile(rec: Instrument, n_prompts: int, overhead: dict[str, float] | None, total_s: float) -> str:
    lines = [
        f"where the time goes (pie_lib, one pass, {n_prompts} prompts; seconds per prompt, share of {total_s / n_prompts:.4f})"
    ]
    sec = dict(rec.seconds)
    run_total = sec.pop("PatchEvaluator.run (total)", 0.0)
    inside = sec.get("patch offsets", 0.0) + sec.get("patch forwards (traces)", 0.0)
    sec["evaluator: metric/KL/host copies"] = max(0.0, run_total - inside)
    known = sum(sec.values())
    sec["other (selection logic, Python)"] = max(0.0, total_s - known)
    for k, v in sorted(sec.items(), key=lambda kv: -kv[1]):
        extra = f"  calls {rec.calls.get(k, '')}" if k in rec.calls else ""
        if k in rec.rows:
            extra += f", {rec.rows[k] / n_prompts:.0f} sequences/prompt"
        lines.append(f"  {k:<36}{v / n_prompts:>10.4f}  {100 * v / max(total_s, 1e-12):5.1f}%{extra}")
    if overhead:
        n_traces = (
            rec.calls.get("patch forwards (traces)", 0)
            + rec.calls.get("gradients (fwd+bwd traces)", 0)
            + rec.calls.get("caches: clean+corrupted forwards", 0)
        )
        est = overhead["overhead_s"] * n_traces
        lines.append(
            f"  nnsight trace overhead: {1e3 * overhead['overhead_s']:.1f} ms per trace "
            f"({1e3 * overhead['trace_s']:.1f} ms traced vs {1e3 * overhead['plain_s']:.1f} ms plain, "
            f"{overhead['rows']} rows); x {n_traces} traces = ~{est / n_prompts:.4f} s/prompt "
            f"({100 * est / max(total_s, 1e-12):.1f}%)"
        )
    return "\n".join(lines)


def profile_pass(
    model: LoadedModel, clt: Any, batches: list[PairBatch], cfg: BenchConfig, top: int = 20
) -> dict[str, Any]:
    """One instrumented pie_lib pass under ``torch.profiler``; prints the breakdown and top ops."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if str(model.device).startswith("cuda") else [])
    mem = PeakMemory(model.device)
    n_prompts = sum(b.size for b in batches)
    with instrument(model.device) as rec, profile(activities=acts) as prof:
        t0 = time.perf_counter()
        pie_pass(model, clt, batches, cfg, mem, PhaseLog())
        sync(model.device)
        total = time.perf_counter() - t0
    overhead = trace_overhead(model, batches[0], min(cfg.scoring.chunk or 64, 64))
    print(format_profile(rec, n_prompts, overhead, total))
    key = "self_cuda_time_total" if len(acts) > 1 else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=top))
    return {"seconds": rec.seconds, "calls": rec.calls, "rows": rec.rows, "total_s": total, "trace_overhead": overhead}


def hardware() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


# ============================================================================ worlds
def ioi_vocabulary_texts() -> list[str]:
    """Texts whose words form a vocabulary on which ``generate_task("ioi", ...)`` works."""
    from pie_lib.data.tasks import IOI_TEMPLATES, NAMES, OBJECTS, PLACES

    return list(IOI_TEMPLATES) + [" ".join(NAMES + PLACES + OBJECTS)]


def random_clt_for(
    model: LoadedModel,
    calib_ids: torch.Tensor,
    n_features: int,
    active_per_token: float,
    seed: int = 0,
    bias_std: float = 0.0,
    round_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor] | None, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random CLT encoder + JumpReLU thresholds calibrated on ``calib_ids`` ``[B, T]``.

    Encoder rows are scaled by 1 / (mean residual norm of their layer); each layer's threshold is
    the pre-activation quantile (over tokens after BOS and features) that leaves
    ``active_per_token / L`` features firing per token and layer, so ~``active_per_token`` fire per
    token in total. Decoder rows are drawn later (they can be huge); their per-layer scale is
    returned: ``out_scale[l] / sqrt(D * active per layer)``, so the summed writes have the size of
    a real MLP output. ``round_dtype``: round W_enc to it before calibrating (bf16 on disk).

    Returns:
        (W_enc ``[L, F, D]``, b_enc ``[L, F]``, None, b_dec ``[L, D]``, threshold ``[L, F]``,
        dec_scale ``[L]``), all float32 on the model's device.
    """
    dev = model.device
    cache = run_with_cache(model, calib_ids)
    resid = cache.resid_mid[:, :, 1:].float()  # [L, B, T-1, D] (BOS excluded)
    L, D = resid.shape[0], resid.shape[-1]
    g = torch.Generator(device="cpu").manual_seed(seed)
    scale = resid.flatten(1, 2).norm(dim=-1).mean(-1).clamp_min(1e-6)  # [L]
    W_enc = torch.randn(L, n_features, D, generator=g).to(dev) / scale[:, None, None]
    if round_dtype is not None:  # calibrate the weights as they will be stored
        W_enc = W_enc.to(round_dtype).float()
    b_enc = (torch.randn(L, n_features, generator=g) * bias_std).to(dev)
    per_layer = max(active_per_token / L, 0.5)
    frac = min(per_layer / n_features, 0.5)
    thr = torch.empty(L, n_features, device=dev)
    for l in range(L):
        pre = (resid[l].flatten(0, 1) @ W_enc[l].T + b_enc[l]).flatten()  # [tokens * F]
        k = max(1, int(round((1 - frac) * pre.numel())))
        thr[l] = pre.float().kthvalue(k).values.clamp_min(1e-4)
    out_scale = cache.mlp_out[:, :, 1:].float().flatten(1, 2).norm(dim=-1).mean(-1)
    dec_scale = out_scale / math.sqrt(D * per_layer)
    return W_enc, b_enc, None, torch.zeros(L, D, device=dev), thr, dec_scale


def build_synthetic_world(
    folder: Path, seed: int = 0, n_features: int = 512, active_per_token: float = 60.0, rebuild: bool = False
) -> tuple[Path, Path]:
    """A random Llama of the toy's shapes + a calibrated random CLT, cached in ``folder``."""
    from pie_lib.models.random_init import random_model
    from pie_lib.toy.tokenizer import build_tokenizer

    model_dir, clt_dir = folder / "model", folder / "clt"
    stamp = folder / "world.json"
    spec = {"version": 1, "seed": seed, "n_features": n_features, "active_per_token": active_per_token}
    if not rebuild and stamp.exists() and json.loads(stamp.read_text()) == spec:
        return model_dir, clt_dir
    folder.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(ioi_vocabulary_texts())
    hf = random_model(
        "llama",
        vocab_size=len(tok),
        seed=seed,
        hidden_size=96,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    hf.save_pretrained(model_dir)
    tok.save_pretrained(str(model_dir))
    model = load_model(model_dir, device="cpu", dtype="float32")
    from pie_lib.data.tasks import generate_task

    pairs = generate_task("ioi", model.tokenizer, 16, seed=seed + 1).pairs
    ids = [model.tokenize([p.text_clean])[0] for p in pairs]
    T = min(len(i) for i in ids)
    calib = torch.tensor([i[:T] for i in ids])
    W_enc, b_enc, _, b_dec, thr, dec_scale = random_clt_for(model, calib, n_features, active_per_token, seed)
    g = torch.Generator().manual_seed(seed + 7)
    L, D = model.n_layers, model.d_model
    W_dec = [torch.randn(n_features, L - l, D, generator=g) * float(dec_scale[l]) for l in range(L)]
    save_clt(clt_dir, W_enc, b_enc, W_dec, b_dec, thr, model_name="synthetic-toy-llama")
    stamp.write_text(json.dumps(spec))
    return model_dir, clt_dir


def resolve_world(args: argparse.Namespace) -> tuple[str, Path, Path]:
    """(name, model folder, CLT folder) for --model/--clt, the toy world, or the synthetic one."""
    if args.model or args.clt:
        if not (args.model and args.clt):
            raise SystemExit("pass both --model and --clt (or neither, for the toy world)")
        return "custom", Path(args.model), Path(args.clt)
    from pie_lib import toy

    toy_ok = toy.toy_model_path("llama").exists() and toy.toy_clt_path("llama").exists()
    if args.world == "toy" or (args.world == "auto" and toy_ok):
        if not toy_ok:
            raise SystemExit("the toy world is not built yet (pie_lib/toy/assets/llama); use --world synthetic")
        return "toy-llama", toy.toy_model_path("llama"), toy.toy_clt_path("llama")
    folder = Path(args.cache).expanduser() / f"synthetic-llama-s{args.seed}"
    m, c = build_synthetic_world(folder, seed=args.seed, active_per_token=args.active_per_token)
    return "synthetic-toy-shapes", m, c


def ioi_batches(model: LoadedModel, n: int, seed: int, batch_size: int) -> list[PairBatch]:
    """IOI pairs from the model's tokenizer, grouped into equal-length batches."""
    from pie_lib.data.tasks import generate_task

    pairs = generate_task("ioi", model.tokenizer, n, seed=seed).pairs
    return tokenize_pairs(model, pairs, batch_size=batch_size).batches


# ============================================================================ the benchmark
@dataclass
class BenchConfig:
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    k: list[int] = field(default_factory=lambda: list(DEFAULT_LADDER))
    k_frac: list[float] = field(default_factory=list)
    syn_k: int | None = 50
    syn_frac: float | None = None
    seed: int = 0
    repeats: int = 3
    warmup: int = 1  # warm-up passes over the first batch
    naive: bool = True
    naive_repeats: int = 1
    check: bool = True
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    params: MethodParams = field(default_factory=MethodParams)


def budgets(counts: torch.Tensor, cfg: BenchConfig) -> list[tuple[str, torch.Tensor]]:
    """The ladder as (label, ``[B]`` per-prompt budgets), like ``pie prune`` builds it."""
    out = [(str(k), torch.full((counts.numel(),), int(k), dtype=torch.long)) for k in cfg.k]
    out += [(f"f{f:g}", torch.clamp(torch.ceil(f * counts.double()).long(), min=1)) for f in cfg.k_frac]
    return out


def syn_budget(counts: torch.Tensor, cfg: BenchConfig) -> torch.Tensor:
    if cfg.syn_frac is not None:
        return torch.clamp(torch.ceil(cfg.syn_frac * counts.double()).long(), min=1)
    return torch.full((counts.numel(),), int(cfg.syn_k or 50), dtype=torch.long)


@dataclass
class PassOutput:
    """Per batch: what pie_lib selected / measured, its counters, and (for the naive comparison
    only) its context. Without the naive check the context is dropped as soon as the batch is done,
    so memory stays that of one batch whatever ``--n`` (a kept context holds the batch's decoder
    rows and caches: ~1 GB per prompt at Llama-3.2-1B's shape)."""

    ctx: BatchContext | None
    counts: torch.Tensor  # [B] active occurrences per prompt
    n_forwards: int
    n_sequences: int
    seq_len: int
    size: int
    fap: torch.Tensor
    syn_keep: torch.Tensor
    keeps: dict[tuple[str, str], torch.Tensor]
    ev: dict[str, torch.Tensor]


def pie_pass(
    model: LoadedModel, clt: Any, batches: list[PairBatch], cfg: BenchConfig, mem: PeakMemory, log: PhaseLog
) -> list[PassOutput]:
    """One timed pass of pie_lib over every batch."""
    return [_pie_batch(model, clt, batch, cfg, mem, log) for batch in batches]


def _pie_batch(
    model: LoadedModel, clt: Any, batch: PairBatch, cfg: BenchConfig, mem: PeakMemory, log: PhaseLog
) -> PassOutput:
    """One batch; its context is freed on return unless the naive check needs it."""
    dev = model.device
    with log.phase("setup", dev, mem):
        ctx = BatchContext(model, clt, batch, cfg.scoring)
    with log.phase("grad", dev, mem):
        ctx.grads(cfg.scoring.gradient)
        if "clt-relp" in cfg.methods:
            ctx.grads("relp")
    with log.phase("fap", dev, mem):
        mode = cfg.scoring.gradient
        s = ctx.cached(f"fap:{mode}", lambda: fap_scores(ctx.occ, ctx.grads(mode), ctx.rows, cfg.scoring.corruption))
    counts = ctx.occ.counts().cpu()
    with log.phase("synergy", dev, mem):
        syn_cfg = SynergyConfig(**{**cfg.params.synergy.__dict__, "seed": cfg.seed})
        syn_keep = synergy_rerank(ctx.evaluator, s, syn_budget(counts, cfg), syn_cfg, cache=ctx.synergy)
    keeps: dict[tuple[str, str], torch.Tensor] = {}
    for m in get_methods(cfg.methods):
        with log.phase(f"select[{m.name}]", dev, mem):
            for lab, kv in budgets(counts, cfg):
                keeps[(m.name, lab)], _ = m.select(ctx, kv, cfg.seed, cfg.params)
    with log.phase("evaluate", dev, mem):
        ev = evaluate_keep_masks(ctx, torch.stack(list(keeps.values())))
    return PassOutput(
        ctx if cfg.naive else None,
        counts,
        ctx.evaluator.n_forwards,
        ctx.evaluator.n_sequences,
        int(batch.seq_len),
        batch.size,
        s,
        syn_keep,
        keeps,
        ev,
    )


@dataclass
class CheckReport:
    fap_max_rel_err: float = 0.0
    syn_equal: bool = True
    selections_equal: int = 0
    selections_total: int = 0
    kl_max_abs_err: float = 0.0
    faith_max_abs_err: float = 0.0
    pred_change_equal: bool = True
    mismatches: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.mismatches


def naive_pass(outs: list[PassOutput], cfg: BenchConfig, mem: PeakMemory, log: PhaseLog, check: CheckReport) -> int:
    """One timed pass of the naive reference over the same batches; compares with pie_lib."""
    forwards = 0
    for o in outs:
        ctx = o.ctx
        assert ctx is not None, "pie_pass keeps contexts only when cfg.naive"
        dev = ctx.model.device
        nv = NaiveReference(ctx)
        counts = ctx.occ.counts().cpu()
        with log.phase("fap", dev, mem):
            s = nv.cached("fap", lambda: nv.fap_scores(cfg.scoring.gradient))
        with log.phase("synergy", dev, mem):
            syn_cfg = SynergyConfig(**{**cfg.params.synergy.__dict__, "seed": cfg.seed})
            syn_keep = nv.synergy(s, syn_budget(counts, cfg).tolist(), syn_cfg)
        keeps = {}
        for name in cfg.methods:
            with log.phase(f"select[{name}]", dev, mem):
                for lab, kv in budgets(counts, cfg):
                    keeps[(name, lab)] = nv.select(name, kv.tolist(), cfg.seed, cfg.params.synergy)
        with log.phase("evaluate", dev, mem):
            ev = nv.evaluate(torch.stack(list(o.keeps.values())))  # pie_lib's masks: KLs compare 1:1
        forwards += nv.counters.forwards
        _compare(o, s, syn_keep, keeps, ev, check)
    return forwards


def _compare(o: PassOutput, s: torch.Tensor, syn_keep: torch.Tensor, keeps: dict, ev: dict, check: CheckReport) -> None:
    scale = float(o.fap.abs().max()) if o.fap.numel() else 1.0
    err = float((o.fap - s).abs().max()) / max(scale, 1e-12) if s.numel() else 0.0
    check.fap_max_rel_err = max(check.fap_max_rel_err, err)
    if err > 1e-4:
        check.mismatches.append(f"FAP scores differ (max error {err:.2e} of max |S|)")
    if not torch.equal(o.syn_keep, syn_keep):
        check.syn_equal = False
        check.mismatches.append(f"FAP-Synergy selection differs on {int((o.syn_keep != syn_keep).sum())} occurrences")
    for key, keep in keeps.items():
        check.selections_total += 1
        if torch.equal(keep, o.keeps[key]):
            check.selections_equal += 1
        else:
            check.mismatches.append(f"selection {key} differs on {int((keep != o.keeps[key]).sum())} occurrences")
    kl_pie, kl_nv = o.ev["kl"].double(), ev["kl"]
    kl_err = float(((kl_pie - kl_nv).abs() / (1.0 + kl_pie.abs())).max()) if kl_pie.numel() else 0.0
    check.kl_max_abs_err = max(check.kl_max_abs_err, kl_err)
    if kl_err > 1e-3:
        check.mismatches.append(f"KL differs (max error {kl_err:.2e})")
    f_pie, f_nv = o.ev["faithfulness"].double(), ev["faithfulness"]
    both = torch.isfinite(f_pie) & torch.isfinite(f_nv)
    f_err = float((f_pie - f_nv)[both].abs().max()) if both.any() else 0.0
    check.faith_max_abs_err = max(check.faith_max_abs_err, f_err)
    if f_err > 1e-2 or not torch.equal(torch.isfinite(f_pie), torch.isfinite(f_nv)):
        check.mismatches.append(f"faithfulness differs (max abs error {f_err:.2e})")
    if not torch.equal(o.ev["pred_change"].bool(), ev["pred_change"]):
        check.pred_change_equal = False  # a near-tie argmax may flip; reported, not fatal


def median_log(logs: list[PhaseLog]) -> PhaseLog:
    names = list(logs[0].seconds)
    return PhaseLog(
        {n: statistics.median(l.seconds.get(n, 0.0) for l in logs) for n in names},
        {n: max(l.peak_mb.get(n, 0.0) for l in logs) for n in names},
        {n: max(l.growth_mb.get(n, 0.0) for l in logs) for n in names},
    )


def run_benchmark(model: LoadedModel, clt: Any, batches: list[PairBatch], cfg: BenchConfig) -> dict[str, Any]:
    """Warm-up (first batch), repeats of pie_lib, then the naive reference on the last pass's contexts.

    Returns:
        A JSON-able dict: phases (seconds per prompt, peak MB) for pie_lib and naive, speed-ups,
        the agreement check, active-set sizes and forward counts.
    """
    mem = PeakMemory(model.device)
    n_prompts = sum(b.size for b in batches)
    logs, outs = [], []
    t_all = time.perf_counter()
    for _ in range(cfg.warmup):  # warm-up: first batch only (kernels, allocator, nnsight caches)
        pie_pass(model, clt, batches[:1], cfg, mem, PhaseLog())
    for _ in range(cfg.repeats):
        log = PhaseLog()
        outs = pie_pass(model, clt, batches, cfg, mem, log)
        logs.append(log)
    pie = median_log(logs)
    result: dict[str, Any] = {
        "n_prompts": n_prompts,
        "memory_kind": mem.kind,
        "n_active": _stats(torch.cat([o.counts.float() for o in outs])),
        "pie_forwards_per_prompt": sum(o.n_forwards for o in outs) / n_prompts,
        "pie_sequences_per_prompt": sum(o.n_sequences for o in outs) / n_prompts,
        "seq_len": _stats(torch.tensor([float(o.seq_len) for o in outs for _ in range(o.size)])),
        "pie": _per_prompt(pie, n_prompts),
    }
    if cfg.naive:
        unsupported = set(cfg.methods) - NAIVE_METHODS
        if unsupported:
            raise SystemExit(
                f"the naive reference implements {sorted(NAIVE_METHODS)}; drop {sorted(unsupported)} or pass --no-naive"
            )
        nlogs, check, fw = [], CheckReport(), 0
        for _ in range(cfg.naive_repeats):
            nlog = PhaseLog()
            check = CheckReport()
            fw = naive_pass(outs, cfg, mem, nlog, check)
            nlogs.append(nlog)
        naive = median_log(nlogs)
        for shared in ("setup", "grad"):  # reused from pie_lib, counted in both totals
            naive.seconds[shared] = pie.seconds[shared]
            naive.peak_mb[shared] = pie.peak_mb[shared]
            naive.growth_mb[shared] = pie.growth_mb[shared]
        result["naive"] = _per_prompt(naive, n_prompts)
        result["naive_forwards_per_prompt"] = fw / n_prompts
        result["speedup"] = {
            k: result["naive"]["seconds_per_prompt"][k] / v if v > 0 else None
            for k, v in result["pie"]["seconds_per_prompt"].items()
        }
        result["check"] = {**check.__dict__, "ok": check.ok}
    result["wall_seconds"] = time.perf_counter() - t_all
    return result


def _stats(x: torch.Tensor) -> dict[str, float]:
    if x.numel() == 0:
        return {"min": 0, "median": 0, "max": 0}
    return {"min": float(x.min()), "median": float(x.median()), "max": float(x.max())}


def _per_prompt(log: PhaseLog, n: int) -> dict[str, Any]:
    sec = {k: v / n for k, v in log.seconds.items()}
    sec["fap_total"] = sec.get("grad", 0.0) + sec.get("fap", 0.0)
    sec["ladder_total"] = sum(v for k, v in sec.items() if k.startswith("select[")) + sec.get("evaluate", 0.0)
    sec["total"] = sum(v for k, v in sec.items() if k not in ("fap_total", "ladder_total", "total"))
    return {"seconds_per_prompt": sec, "peak_mb": dict(log.peak_mb), "growth_mb": dict(log.growth_mb)}


# ============================================================================ reporting
def format_table(result: dict[str, Any], title: str = "") -> str:
    pie = result["pie"]
    naive = result.get("naive")
    names = list(pie["seconds_per_prompt"])
    lines = [title] if title else []

    def mem(side: dict, n: str) -> str:
        if n not in side["peak_mb"]:
            return ""
        return f"{side['peak_mb'][n]:.0f} (+{side['growth_mb'][n]:.0f})"

    hdr = f"{'phase':<22}{'pie_lib s/prompt':>17}{'peak MB (+phase)':>18}"
    if naive:
        hdr += f"{'naive s/prompt':>16}{'peak MB (+phase)':>18}{'speed-up':>10}"
    lines += [hdr, "-" * len(hdr)]
    for n in names:
        p = pie["seconds_per_prompt"][n]
        row = f"{n:<22}{p:>17.4f}{mem(pie, n):>18}"
        if naive:
            q = naive["seconds_per_prompt"][n]
            shared = n in ("setup", "grad")
            sp = "shared" if shared else (f"{q / p:.1f}x" if p > 0 else "-")
            row += f"{q:>16.4f}{mem(naive, n):>18}{sp:>10}"
        lines.append(row)
    lines.append(
        f"prompts: {result['n_prompts']}; active occurrences per prompt: {result['n_active']}; "
        f"pie_lib patch forwards/prompt: {result['pie_forwards_per_prompt']:.1f}"
        + (f"; naive forwards/prompt: {result['naive_forwards_per_prompt']:.0f}" if naive else "")
    )
    lines.append(f"memory: {result['memory_kind']}")
    if "check" in result:
        c = result["check"]
        lines.append(
            f"agreement: {'OK' if c['ok'] else 'MISMATCH'} -- selections {c['selections_equal']}/{c['selections_total']} "
            f"equal, synergy equal={c['syn_equal']}, FAP max rel err {c['fap_max_rel_err']:.1e}, "
            f"KL max err {c['kl_max_abs_err']:.1e}, faithfulness max err {c['faith_max_abs_err']:.1e}"
            + ("" if c["pred_change_equal"] else ", pred-change flags differ (near-tie argmax)")
        )
        for m in c["mismatches"][:10]:
            lines.append(f"  ! {m}")
    return "\n".join(lines)


def set_threads(n: int | None) -> None:
    if n:
        torch.set_num_threads(n)


def add_common_args(
    p: argparse.ArgumentParser,
    batch_help: str = "prompts per batch",
    dtype_help: str = "model dtype (default float32 on CPU, bfloat16 on GPU)",
) -> None:
    p.add_argument("--n", type=int, default=8, help="number of pairs")
    p.add_argument("--batch-size", type=int, default=8, help=batch_help)
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    p.add_argument("--k", default=",".join(map(str, DEFAULT_LADDER)), help="absolute K ladder ('' for none)")
    p.add_argument("--k-frac", default="", help="K ladder as fractions of each prompt's active set")
    p.add_argument("--syn-k", type=int, default=50, help="budget of the standalone FAP-Synergy timing")
    p.add_argument("--syn-frac", type=float, default=None, help="... or as a fraction of the active set")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--naive-repeats", type=int, default=1)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, help=dtype_help)
    p.add_argument(
        "--chunk",
        type=int,
        default=None,
        help="patch variants per forward (pie_lib; default: sized from free memory and prompt length)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: on a shared, oversubscribed CPU, OpenMP spin-waits make "
        "2 threads up to 100x slower than 1; 0 = torch's default)",
    )
    p.add_argument("--json", default=None, help="write the result table as JSON here")
    p.add_argument(
        "--profile",
        action="store_true",
        help="also run one instrumented pass under torch.profiler and print where the time goes",
    )


def bench_config(args: argparse.Namespace, naive: bool) -> BenchConfig:
    ints = [int(x) for x in args.k.split(",") if x.strip()]
    fracs = [float(x) for x in args.k_frac.split(",") if x.strip()]
    return BenchConfig(
        methods=[m.strip() for m in args.methods.split(",") if m.strip()],
        k=ints,
        k_frac=fracs,
        syn_k=args.syn_k,
        syn_frac=args.syn_frac,
        seed=args.seed,
        repeats=args.repeats,
        warmup=args.warmup,
        naive=naive,
        naive_repeats=args.naive_repeats,
        scoring=ScoringConfig(chunk=args.chunk),
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_args(p)
    p.add_argument("--world", choices=("auto", "toy", "synthetic"), default="auto")
    p.add_argument("--model", default=None, help="local model folder (with --clt)")
    p.add_argument("--clt", default=None, help="local CLT folder (with --model)")
    p.add_argument("--cache", default="~/.cache/pie_lib/prune_speed", help="where the synthetic world is built")
    p.add_argument("--active-per-token", type=float, default=60.0, help="synthetic CLT: features firing per token")
    p.add_argument("--no-naive", action="store_true", help="time pie_lib only")
    args = p.parse_args(argv)
    set_threads(args.threads)
    torch.manual_seed(args.seed)
    hw = hardware()
    world, model_dir, clt_dir = resolve_world(args)
    model = load_model(model_dir, device=args.device or "cpu", dtype=args.dtype)
    clt = load_clt(clt_dir, device=model.device)
    model.check_clt(clt)
    batches = ioi_batches(model, args.n, args.seed, args.batch_size)
    cfg = bench_config(args, naive=not args.no_naive)
    result = run_benchmark(model, clt, batches, cfg)
    if args.profile:
        result["profile"] = profile_pass(model, clt, batches, cfg)
    result.update(
        world=world,
        model=str(model_dir),
        clt=str(clt_dir),
        device=str(model.device),
        dtype=str(model.dtype),
        hardware=hw,
        config={
            "methods": cfg.methods,
            "k": cfg.k,
            "k_frac": cfg.k_frac,
            "syn_k": cfg.syn_k,
            "syn_frac": cfg.syn_frac,
            "seed": cfg.seed,
            "repeats": cfg.repeats,
            "warmup": cfg.warmup,
            "naive_repeats": cfg.naive_repeats,
            "batch_size": args.batch_size,
            "chunk": args.chunk,
        },
    )
    result["hardware"]["loadavg_end"] = list(os.getloadavg())
    title = (
        f"prune_speed: {world} ({model.n_layers} layers, d_model {model.d_model}, {clt.n_features} features/layer), "
        f"{model.device} {model.dtype}, {len(cfg.methods)} methods x {len(budgets(torch.ones(1), cfg))} budgets"
    )
    print(format_table(result, title))
    return finish(result, args.json, cfg.naive)


def finish(result: dict, json_path: str | None, checked: bool) -> dict:
    """Save the result table (``--json``) and exit 1 when pie_lib and the naive reference disagree."""
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(result, indent=2, default=str))
    if checked and not result["check"]["ok"]:
        print("pie_lib and the naive reference DISAGREE", file=sys.stderr)
        sys.exit(1)
    return result


if __name__ == "__main__":
    main()
