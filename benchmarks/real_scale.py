"""Prune-stage timings at the paper's real shapes (Llama-3.2-1B / Gemma-2-2B with their CLTs).

The weights are random (nothing is downloaded): a random model with the published shapes and a
random JumpReLU CLT in circuit-tracer format (bf16 on disk) whose thresholds are calibrated on a
few random prompts so ~``--active-per-token`` features fire per token in total across layers.
Both are built once and cached under ``--cache/<shape>[-s<scale>]``.

Timed for ``--n`` IOI-shaped pairs (random token ids, 15-20 tokens, three "name" positions
changed in the corrupted prompt): FAP scoring, FAP-Synergy at K=50, and the K ladder
(default 50,75,100,200,400,800) of 5 methods (fap, fap-synergy, clt-relp, act-mag, random) with
circuit / complement / null evaluation; peak memory per phase. ``--profile`` adds where the time
goes (trace overhead, caches, encode, gradients, decoder rows, projection, offsets, forwards).

Full scale needs a GPU machine with disk: the Llama CLT's decoders are ~9.1e9 values (18 GB bf16),
Gemma's ~1.3e10 (27 GB). ``--scale S`` divides layers (min 2), d_model, heads, MLP width, vocab and
features by S for CPU smoke runs.

Examples::

    python benchmarks/real_scale.py --shape llama-3.2-1b --scale 16 --n 8           # CPU smoke
    python benchmarks/real_scale.py --shape llama-3.2-1b --n 500 --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import prune_speed as ps  # noqa: E402

from pie_lib.clt import load_clt, save_clt  # noqa: E402
from pie_lib.clt.lazy import MemmapTensor  # noqa: E402
from pie_lib.models.loading import load_model  # noqa: E402
from pie_lib.models.random_init import REAL_SHAPES, random_model, word_tokenizer  # noqa: E402
from pie_lib.prune.occurrences import PairBatch  # noqa: E402

#: Features per layer of the public CLTs (spec §9).
CLT_FEATURES = {"llama-3.2-1b": 32768, "gemma-2-2b": 16384}
BOS = 2  # random_init's bos_token_id
#: Decoders with more values than this are written layer by layer instead of through save_clt.
STREAM_ABOVE = 200_000_000


def scaled_shape(shape: str, scale: int) -> tuple[str, dict[str, Any], int]:
    """(arch, config overrides, features per layer) of ``shape`` divided by ``scale``."""
    if shape not in REAL_SHAPES:
        raise SystemExit(f"unknown --shape {shape!r}; choose one of {sorted(REAL_SHAPES)}")
    arch, cfg = REAL_SHAPES[shape]
    cfg = dict(cfg)
    F = CLT_FEATURES[shape]
    if scale > 1:
        heads = max(1, cfg["num_attention_heads"] // scale)
        kv = max(1, cfg["num_key_value_heads"] // scale)
        while heads % kv:
            kv -= 1
        head_dim = max(8, cfg["head_dim"] // scale)
        cfg.update(
            hidden_size=max(16, cfg["hidden_size"] // scale),
            intermediate_size=max(32, cfg["intermediate_size"] // scale),
            num_hidden_layers=max(2, cfg["num_hidden_layers"] // scale),
            num_attention_heads=heads,
            num_key_value_heads=kv,
            head_dim=head_dim,
            vocab_size=max(512, cfg["vocab_size"] // scale),
        )
        if "query_pre_attn_scalar" in cfg:
            cfg["query_pre_attn_scalar"] = head_dim
        F = max(64, F // scale)
    return arch, cfg, F


def _stream_write_clt(
    folder: Path,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    b_dec: torch.Tensor,
    thr: torch.Tensor,
    make_dec,
    model_name: str,
    dtype: torch.dtype,
) -> Path:
    """circuit-tracer CLT layout written one layer at a time (the decoders never sit in memory whole).

    Same files, keys and config as :func:`pie_lib.clt.save_clt`; ``make_dec(l)`` returns W_dec_l.
    """
    import yaml
    from safetensors.torch import save_file

    L = W_enc.shape[0]
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    cfg = {
        "model_kind": "cross_layer_transcoder",
        "feature_input_hook": "hook_resid_mid",
        "feature_output_hook": "hook_mlp_out",
        "model_name": model_name,
    }
    (tmp / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    for i in range(L):
        enc = {f"W_enc_{i}": W_enc[i], f"b_enc_{i}": b_enc[i], f"b_dec_{i}": b_dec[i], f"threshold_{i}": thr[i]}
        save_file({k: v.to(dtype).contiguous().cpu() for k, v in enc.items()}, str(tmp / f"W_enc_{i}.safetensors"))
        dec = make_dec(i).to(dtype).contiguous().cpu()
        save_file({f"W_dec_{i}": dec}, str(tmp / f"W_dec_{i}.safetensors"))
        del dec
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    return folder


def build_real_scale(
    folder: Path,
    shape: str,
    scale: int = 1,
    seed: int = 0,
    active_per_token: float = 300.0,
    device: str = "cpu",
    disk_dtype: torch.dtype = torch.bfloat16,
    stream: bool | None = None,
    rebuild: bool = False,
    log=print,
) -> tuple[Path, Path, dict[str, Any]]:
    """Build (once) the random model and calibrated random CLT of ``shape`` / ``scale``.

    Returns:
        (model folder, CLT folder, build info incl. the measured active features per token).
    """
    arch, cfg, F = scaled_shape(shape, scale)
    model_dir, clt_dir, stamp = folder / "model", folder / "clt", folder / "build.json"
    spec = {
        "version": 1,
        "shape": shape,
        "scale": scale,
        "seed": seed,
        "active_per_token": active_per_token,
        "disk_dtype": str(disk_dtype),
        "features": F,
        "config": dict(cfg),
    }
    if not rebuild and stamp.exists():
        info = json.loads(stamp.read_text())
        if info.get("spec") == spec:
            return model_dir, clt_dir, info
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    vocab = cfg.pop("vocab_size")
    log(
        f"building random {shape} (scale {scale}): {cfg['num_hidden_layers']} layers, d_model {cfg['hidden_size']}, "
        f"vocab {vocab}, CLT {F} features/layer -> {folder}"
    )
    hf = random_model(arch, vocab_size=vocab, seed=seed, **cfg)
    hf.to(disk_dtype).save_pretrained(model_dir)
    word_tokenizer([f"t{i}" for i in range(64)]).save_pretrained(str(model_dir))  # ids are random anyway
    del hf
    run_dtype = torch.float32 if device == "cpu" else torch.bfloat16
    model = load_model(model_dir, device=device, dtype=run_dtype)
    L, D = model.n_layers, model.d_model
    g = torch.Generator().manual_seed(seed + 1)
    calib = torch.randint(3, vocab, (8, 18), generator=g)
    calib[:, 0] = BOS
    W_enc, b_enc, _, b_dec, thr, dec_scale = ps.random_clt_for(
        model, calib, F, active_per_token, seed, round_dtype=disk_dtype
    )
    gdev = torch.Generator(device=model.device).manual_seed(seed + 2)

    def make_dec(l: int) -> torch.Tensor:
        return torch.randn(F, L - l, D, generator=gdev, device=model.device) * float(dec_scale[l])

    n_dec = F * D * L * (L + 1) // 2
    if stream is None:
        stream = n_dec > STREAM_ABOVE
    name = f"random-{shape}" + (f"-scale{scale}" if scale > 1 else "")
    if stream:
        _stream_write_clt(clt_dir, W_enc, b_enc, b_dec, thr, make_dec, name, disk_dtype)
    else:
        W_dec = [make_dec(l).to(disk_dtype) for l in range(L)]
        save_clt(
            clt_dir,
            W_enc.to(disk_dtype),
            b_enc.to(disk_dtype),
            W_dec,
            b_dec.to(disk_dtype),
            thr.to(disk_dtype),
            model_name=name,
        )
        del W_dec
    # what actually fires with the stored (bf16) weights, on fresh random prompts
    clt = load_clt(clt_dir, device=model.device, dtype=torch.float32)
    probe = torch.randint(3, vocab, (4, 18), generator=g)
    probe[:, 0] = BOS
    from pie_lib.engine.traces import run_with_cache

    resid = run_with_cache(model, probe).resid_mid[:, :, 1:].float()
    l0 = sum(float((clt.encode(resid[l], layer=l) != 0).sum(-1).float().mean()) for l in range(L))
    info = {
        "spec": spec,
        "active_per_token_measured": l0,
        "decoder_values": n_dec,
        "streamed": bool(stream),
        "build_seconds": time.perf_counter() - t0,
        "disk_bytes": sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()),
    }
    stamp.write_text(json.dumps(info, indent=2))
    log(
        f"built in {info['build_seconds']:.1f} s; {info['disk_bytes'] / 2**30:.2f} GiB on disk; "
        f"measured active features per token: {l0:.1f}"
    )
    return model_dir, clt_dir, info


def random_pair_batches(
    n: int, vocab: int, seed: int, batch_size: int, lengths: tuple[int, int] = (15, 20)
) -> list[PairBatch]:
    """IOI-shaped pairs of random token ids, grouped by length.

    Clean: BOS + random ids (15-20 tokens). Corrupted: the same with three "name" positions
    (2, 4 and T-3) replaced by other ids, as IOI's abc corruption does. Targets: two random ids.
    """
    g = torch.Generator().manual_seed(seed)
    groups: dict[int, list[int]] = {}
    rows = []
    for i in range(n):
        T = int(torch.randint(lengths[0], lengths[1] + 1, (1,), generator=g))
        clean = torch.randint(3, vocab, (T,), generator=g)
        clean[0] = BOS
        corr = clean.clone()
        for p in (2, 4, T - 3):
            corr[p] = 3 + (int(clean[p]) - 3 + int(torch.randint(1, vocab - 3, (1,), generator=g))) % (vocab - 3)
        tgt = torch.randperm(vocab - 3, generator=g)[:2] + 3
        rows.append((clean, corr, int(tgt[0]), int(tgt[1])))
        groups.setdefault(T, []).append(i)
    batches = []
    for T in sorted(groups):
        idx = groups[T]
        for s in range(0, len(idx), batch_size):
            chunk = idx[s : s + batch_size]
            batches.append(
                PairBatch(
                    clean_ids=torch.stack([rows[i][0] for i in chunk]),
                    corr_ids=torch.stack([rows[i][1] for i in chunk]),
                    correct=torch.tensor([rows[i][2] for i in chunk]),
                    wrong=torch.tensor([rows[i][3] for i in chunk]),
                    prompt_idx=torch.tensor(chunk),
                )
            )
    return batches


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ps.add_common_args(p)
    p.set_defaults(n=16, batch_size=16, repeats=1, warmup=1)
    p.add_argument("--shape", choices=sorted(REAL_SHAPES), default="llama-3.2-1b")
    p.add_argument("--scale", type=int, default=1, help="divide layers (min 2), widths, vocab and features by this")
    p.add_argument("--active-per-token", type=float, default=300.0, help="CLT features firing per token (all layers)")
    p.add_argument(
        "--cache", default="~/.cache/pie_lib/real_scale", help="build folder (one subfolder per shape/scale)"
    )
    p.add_argument("--rebuild", action="store_true")
    p.add_argument("--stream", choices=("auto", "yes", "no"), default="auto", help="write the CLT layer by layer")
    p.add_argument("--rows-dtype", default="float32", help="dtype of gathered decoder rows (pie_lib default float32)")
    p.add_argument("--naive", action="store_true", help="also run the naive reference (slow; small --n only)")
    args = p.parse_args(argv)
    ps.set_threads(args.threads)
    torch.manual_seed(args.seed)
    hw = ps.hardware()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    sub = (
        args.shape
        + (f"-s{args.scale}" if args.scale > 1 else "")
        + (f"-a{args.active_per_token:g}" if args.active_per_token != 300 else "")
    )
    folder = Path(args.cache).expanduser() / sub
    stream = {"auto": None, "yes": True, "no": False}[args.stream]
    model_dir, clt_dir, info = build_real_scale(
        folder,
        args.shape,
        args.scale,
        args.seed,
        args.active_per_token,
        device=device,
        stream=stream,
        rebuild=args.rebuild,
    )
    dtype = args.dtype or ("float32" if device == "cpu" else "bfloat16")
    t0 = time.perf_counter()
    model = load_model(model_dir, device=device, dtype=dtype)
    clt = load_clt(clt_dir, device=model.device, dtype=getattr(torch, dtype))
    load_s = time.perf_counter() - t0
    model.check_clt(clt)
    batches = random_pair_batches(args.n, model.vocab_size, args.seed, args.batch_size)
    cfg = ps.bench_config(args, naive=args.naive)
    cfg.scoring.rows_dtype = getattr(torch, args.rows_dtype)
    result = ps.run_benchmark(model, clt, batches, cfg)
    if args.profile:
        result["profile"] = ps.profile_pass(model, clt, batches, cfg)
    per_prompt = result["pie"]["seconds_per_prompt"]
    target = {k: per_prompt[k] * 500 / 60 for k in ("fap_total", "synergy", "ladder_total", "total")}
    result.update(
        shape=args.shape,
        scale=args.scale,
        build=info,
        load_seconds=load_s,
        device=str(model.device),
        dtype=str(model.dtype),
        hardware=hw,
        projected_minutes_for_500_pairs=target,
        config={
            "methods": cfg.methods,
            "k": cfg.k,
            "k_frac": cfg.k_frac,
            "syn_k": cfg.syn_k,
            "repeats": cfg.repeats,
            "warmup": cfg.warmup,
            "batch_size": args.batch_size,
            "chunk": args.chunk,
            "rows_dtype": args.rows_dtype,
            "lazy_decoder": isinstance(clt.decoder.sources[0], MemmapTensor),
        },
    )
    result["hardware"]["loadavg_end"] = list(os.getloadavg())
    title = (
        f"real_scale: random {args.shape}"
        + (f" / scale {args.scale}" if args.scale > 1 else "")
        + f" ({model.n_layers} layers, d_model {model.d_model}, vocab {model.vocab_size}, {clt.n_features} CLT "
        f"features/layer, {info['active_per_token_measured']:.0f} active/token), {model.device} {model.dtype}, "
        f"{len(cfg.methods)} methods x {len(ps.budgets(torch.ones(1), cfg))} budgets"
    )
    print(ps.format_table(result, title))
    print(
        f"projected for 500 pairs on this device (minutes): FAP {target['fap_total']:.2f}, FAP-Synergy@{cfg.syn_k} {target['synergy']:.2f}, "
        f"K-ladder {target['ladder_total']:.2f}, everything {target['total']:.2f}"
        + (
            " (target: < 5 at full scale on one H200)"
            if args.scale == 1 and "cuda" in str(model.device)
            else " (the < 5 min target is for full scale on one H200; this is not that run)"
        )
    )
    peak = max(result["pie"]["peak_mb"].values()) / 1024
    print(
        f"peak {'GPU memory allocated' if str(model.device).startswith('cuda') else 'RSS'}: {peak:.2f} GiB "
        f"(model load {load_s:.1f} s; CLT decoders {'lazy (memory-mapped)' if result['config']['lazy_decoder'] else 'in memory'})"
    )
    return ps.finish(result, args.json, cfg.naive)


if __name__ == "__main__":
    main()
