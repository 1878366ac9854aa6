"""PAHQ-style mixed precision: speed and KL error of patching forwards versus full precision.

For one batch of pairs it builds patching offsets (the null circuit and FAP top-K circuits),
then runs the same patched forwards

- in full precision (the model's dtype, float32 on CPU),
- with every decoder layer in the fast dtype (bfloat16 on CPU) except a full-precision set:
  ``none`` (all layers reduced), ``sources`` (the source layers of the kept occurrences), or one
  layer (``layer<i>``, the layer holding most kept occurrences),

and prints seconds per forward (casts amortised in one ``reduced_precision`` block, and per call
with the cast included), the error KL(P_fp32 || P_pahq) of the patched last-token distributions,
and the change of the circuit KL(clean || patched) that PIE reports.

Usage::

    python benchmarks/pahq_precision.py                 # toy world when built, else a random model
    python benchmarks/pahq_precision.py --world /tmp/toy/llama          # a toy world built elsewhere
    python benchmarks/pahq_precision.py --random --d-model 512 --layers 8   # a larger random model
    OMP_NUM_THREADS=1 python benchmarks/pahq_precision.py --threads 1
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch


def build_random(folder: Path, d_model: int, layers: int, n_features: int, n_pairs: int) -> tuple[Path, Path, Path]:
    """A random Llama, random word pairs, and a random JumpReLU CLT whose thresholds make ~3% of
    features fire on the clean prompts."""
    from pie_lib.clt import save_clt
    from pie_lib.data.pairs import Pair, save_pairs
    from pie_lib.engine.traces import run_with_cache
    from pie_lib.models.loading import load_model
    from pie_lib.models.random_init import save_random_model

    words = [f"w{i}" for i in range(200)]
    heads = max(1, d_model // 64) if d_model >= 64 else 4
    save_random_model(
        folder / "model",
        "llama",
        words,
        seed=0,
        hidden_size=d_model,
        intermediate_size=4 * d_model,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
    )
    r = random.Random(0)
    pairs = []
    for _ in range(n_pairs):
        a = [r.choice(words) for _ in range(12)]
        b = list(a)
        b[2], b[5] = r.choice(words), r.choice(words)
        pairs.append(Pair(" ".join(a), " ".join(b), " " + r.choice(words), " " + r.choice(words)))
    save_pairs(pairs, folder / "pairs.jsonl")
    model = load_model(folder / "model", device="cpu")
    cache = run_with_cache(model, torch.tensor(model.tokenize([p.text_clean for p in pairs])))
    L, D, F = layers, d_model, n_features
    g = torch.Generator().manual_seed(0)
    W_enc = torch.randn(L, F, D, generator=g)
    pre = torch.einsum("lnd,lfd->lnf", cache.resid_mid[:, :, 1:].flatten(1, 2), W_enc)
    thr = torch.quantile(pre, 0.97, dim=1).clamp_min(1e-3)
    out_scale = cache.mlp_out.flatten(1, 2).norm(dim=-1).mean(-1)
    W_dec = [torch.randn(F, L - i, D, generator=g) * out_scale[i] / D**0.5 for i in range(L)]
    save_clt(folder / "clt", W_enc, torch.zeros(L, F), W_dec, torch.zeros(L, D), thr)
    return folder / "model", folder / "clt", folder / "pairs.jsonl"


def timed(fn, repeats: int) -> tuple[float, object]:
    out = fn()  # warm-up
    t = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        t.append(time.perf_counter() - t0)
    return statistics.median(t), out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--random", action="store_true", help="use a random model even when the toy world exists")
    ap.add_argument(
        "--world",
        type=Path,
        default=None,
        help="a toy-world arch folder with model/ and clt/ (default: pie_lib.toy's llama assets)",
    )
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--features", type=int, default=256)
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("--k", type=str, default="10,50")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 = stable timings on a shared machine)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from pie_lib import toy
    from pie_lib.clt.io import load_clt
    from pie_lib.data.pairs import load_pairs
    from pie_lib.engine.masked import last_token_kl
    from pie_lib.engine.traces import patched_last_logits
    from pie_lib.models.loading import load_model
    from pie_lib.prune.context import BatchContext, ScoringConfig
    from pie_lib.prune.methods import fap
    from pie_lib.prune.related.pahq import fast_dtype, pahq_patched_last_logits, reduced_precision, source_layers
    from pie_lib.prune.select import topk_global

    model_dir = args.world / "model" if args.world else toy.toy_model_path("llama")
    clt_dir = args.world / "clt" if args.world else toy.toy_clt_path("llama")
    use_toy = not args.random and (model_dir / "config.json").exists() and clt_dir.exists()
    tmp = tempfile.TemporaryDirectory()
    if use_toy:
        from pie_lib.data.tasks import generate_task

        model = load_model(model_dir, device="cpu")
        clt = load_clt(clt_dir)
        pairs = generate_task("ioi", model.tokenizer, args.pairs, seed=0).pairs
        world = f"toy llama ({model_dir.parent}), IOI"
    else:
        mdir, cdir, ppath = build_random(Path(tmp.name), args.d_model, args.layers, args.features, args.pairs)
        model = load_model(mdir, device="cpu")
        clt = load_clt(cdir)
        pairs = load_pairs(ppath)
        world = f"random llama d_model={args.d_model} layers={args.layers} F={args.features}"

    from pie_lib.prune.occurrences import tokenize_pairs

    batch = max(tokenize_pairs(model, pairs, batch_size=args.pairs).batches, key=lambda b: b.size)
    ctx = BatchContext(model, clt, batch, ScoringConfig())
    ev = ctx.evaluator
    B = batch.size
    ks = [int(x) for x in args.k.split(",")]
    # variants: the null circuit and FAP top-K circuits (offsets = null - kept writes)
    s = fap(ctx)
    offs, kept_all = [ev.null_offsets()], []
    for k in ks:
        keep = topk_global(ctx.occ, s, k)
        kept = keep.nonzero().squeeze(-1)
        kept_all.append(kept)
        offs.append(ev.null_offsets() - ev.offsets(ctx.occ.prompt[kept], kept, None, B))
    offsets = torch.cat(offs, dim=1)  # [L, (1 + len(ks)) * B, T, D]
    ids = batch.clean_ids.repeat(1 + len(ks), 1)
    clean = ev.clean_logits.repeat(1 + len(ks), 1)
    labels = ["null"] + [f"K={k}" for k in ks]

    kept_cat = torch.cat(kept_all)
    by_layer = torch.bincount(ctx.occ.layer[kept_cat], minlength=model.n_layers)
    sets = {
        "none": [],
        "sources": source_layers(ctx.occ, kept_cat),
        f"layer{int(by_layer.argmax())}": [int(by_layer.argmax())],
    }
    dtype = fast_dtype(model.device)
    print(
        f"world: {world}; batch {B} prompts x {batch.seq_len} tokens; {len(ctx.occ)} active occurrences; "
        f"{ids.shape[0]} patched forwards per call; fast dtype {dtype}; torch threads {torch.get_num_threads()}"
    )

    t_full, (ref, _) = timed(lambda: patched_last_logits(model, ids, offsets), args.repeats)
    kl_ref = last_token_kl(clean, ref.float())
    print(f"{'full precision':28s} {t_full * 1e3:8.2f} ms/call")
    for name, keep_layers in sets.items():
        with reduced_precision(model, keep_layers, dtype) as reduced:
            t_amort, (lo, _) = timed(lambda: patched_last_logits(model, ids, offsets), args.repeats)
        t_call, _ = timed(lambda: pahq_patched_last_logits(model, ids, offsets, keep_layers, dtype), args.repeats)
        lo = lo.float()
        err = last_token_kl(ref.float(), lo)
        kl_lo = last_token_kl(clean, lo)
        parts = []
        for j, lab in enumerate(labels):
            sl = slice(j * B, (j + 1) * B)
            parts.append(f"{lab}: KL {kl_ref[sl].mean():.4f}->{kl_lo[sl].mean():.4f}")
        print(
            f"fp32 layers={str(keep_layers):14s} reduced={len(reduced)}/{model.n_layers}  "
            f"{t_amort * 1e3:8.2f} ms/call amortised ({t_full / t_amort:4.2f}x), {t_call * 1e3:8.2f} ms with cast "
            f"({t_full / t_call:4.2f}x)  KL(fp32||pahq) mean {err.mean():.2e} max {err.max():.2e}  |  "
            + "; ".join(parts)
        )
    tmp.cleanup()


if __name__ == "__main__":
    main()
