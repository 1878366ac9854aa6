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
import math
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

from pie_lib.clt import load_clt  # noqa: E402
from pie_lib.clt.lazy import SafetensorsRows  # noqa: E402
from pie_lib.models.loading import load_model  # noqa: E402
from pie_lib.models.random_init import REAL_SHAPES, random_model, word_tokenizer  # noqa: E402
from pie_lib.prune.occurrences import PairBatch  # noqa: E402

#: Features per layer of the public CLTs (spec §9).
CLT_FEATURES = {"llama-3.2-1b": 32768, "gemma-2-2b": 16384}
BOS = 2  # random_init's bos_token_id


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


def _write_safetensors_streamed(path: Path, key: str, shape: tuple[int, ...], dtype: torch.dtype, chunks) -> None:
    """Write one tensor as a safetensors file from ``chunks`` (tensors along dim 0), never whole in memory.

    The format is an 8-byte little-endian header length, a JSON header, then the raw row-major
    bytes; ``chunks`` must yield exactly ``shape[0]`` rows in order.
    """
    import struct

    names = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}
    itemsize = torch.empty(0, dtype=dtype).element_size()
    nbytes = itemsize * math.prod(shape)
    header = json.dumps(
        {
            key: {"dtype": names[dtype], "shape": list(shape), "data_offsets": [0, nbytes]},
            "__metadata__": {"format": "pt"},
        }
    ).encode()
    header += b" " * (-len(header) % 8)
    written = 0
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(header)))
        fh.write(header)
        for c in chunks:
            c = c.to(dtype).contiguous().cpu()
            raw = c.view(torch.int16) if itemsize == 2 else c.view(torch.int32)
            fh.write(raw.numpy().tobytes())
            written += c.numel() * itemsize
    if written != nbytes:
        raise RuntimeError(f"{path}: wrote {written} bytes, expected {nbytes}")


def build_real_scale(
    folder: Path,
    shape: str,
    scale: int = 1,
    seed: int = 0,
    active_per_token: float = 300.0,
    device: str = "cpu",
    disk_dtype: torch.dtype = torch.bfloat16,
    calib_dtype: str = "float32",
    rebuild: bool = False,
    log=print,
) -> tuple[Path, Path, dict[str, Any]]:
    """Build (once) the random model and calibrated random CLT of ``shape`` / ``scale``, layer by layer.

    Memory stays near one model in ``disk_dtype`` plus one layer's encoder: the model is initialised
    directly in ``disk_dtype``; each layer's encoder is drawn, rounded to ``disk_dtype``, calibrated
    (JumpReLU threshold = the pre-activation quantile leaving ``active_per_token / L`` features per
    token and layer, on 8 random prompts) and written; each decoder is drawn and streamed to its
    file in chunks of features. A full-scale Llama CLT (18 GB bf16) builds in a few GB of RAM.

    Returns:
        (model folder, CLT folder, build info incl. the measured active features per token).
    """
    import yaml
    from safetensors.torch import save_file

    arch, cfg, F = scaled_shape(shape, scale)
    model_dir, clt_dir, stamp = folder / "model", folder / "clt", folder / "build.json"
    spec = {
        "version": 2,
        "shape": shape,
        "scale": scale,
        "seed": seed,
        "active_per_token": active_per_token,
        "disk_dtype": str(disk_dtype),
        "calib_dtype": calib_dtype,
        "features": F,
        "config": dict(cfg),
    }
    if not rebuild and stamp.exists():
        info = json.loads(stamp.read_text())
        if info.get("spec") == spec:
            return model_dir, clt_dir, info
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    t0 = time.perf_counter()
    vocab = cfg.pop("vocab_size")
    log(
        f"building random {shape} (scale {scale}): {cfg['num_hidden_layers']} layers, d_model {cfg['hidden_size']}, "
        f"vocab {vocab}, CLT {F} features/layer -> {folder}"
    )
    default = torch.get_default_dtype()
    torch.set_default_dtype(disk_dtype)  # initialise in the stored dtype: no float32 copy of a 2.6B model
    try:
        hf = random_model(arch, vocab_size=vocab, seed=seed, dtype=disk_dtype, **cfg)
    finally:
        torch.set_default_dtype(default)
    hf.save_pretrained(model_dir, max_shard_size="1GB")  # one shard serialised at a time: no second model in RAM
    tok = word_tokenizer([f"t{i}" for i in range(64)])  # ids are random anyway
    tok.save_pretrained(str(model_dir))
    from pie_lib.engine.traces import run_with_cache
    from pie_lib.models.loading import wrap_model

    # calibrate on the in-memory model (the same weights as on disk): no second copy is loaded
    model = wrap_model(hf.to(device=device, dtype=getattr(torch, calib_dtype)), tok, name=str(model_dir))
    L, D = model.n_layers, model.d_model
    g = torch.Generator().manual_seed(seed + 1)
    calib = torch.randint(3, vocab, (8, 18), generator=g)
    calib[:, 0] = BOS
    probe = torch.randint(3, vocab, (4, 18), generator=g)
    probe[:, 0] = BOS
    cache = run_with_cache(model, calib)
    resid = cache.resid_mid[:, :, 1:].float().flatten(1, 2)  # [L, tokens, D], BOS excluded
    out_scale = cache.mlp_out[:, :, 1:].float().flatten(1, 2).norm(dim=-1).mean(-1)  # [L]
    probe_resid = run_with_cache(model, probe).resid_mid[:, :, 1:].float()  # fresh prompts: what fires
    del cache, model, hf
    per_layer = max(active_per_token / L, 0.5)
    frac = min(per_layer / F, 0.5)
    dec_scale = out_scale / math.sqrt(D * per_layer)  # summed writes ~ the size of a real MLP output
    genc = torch.Generator().manual_seed(seed)
    gdec = torch.Generator().manual_seed(seed + 2)
    name = f"random-{shape}" + (f"-scale{scale}" if scale > 1 else "")
    tmp = Path(tempfile.mkdtemp(prefix="clt.", dir=folder))
    (tmp / "config.yaml").write_text(
        yaml.safe_dump(
            {
                "model_kind": "cross_layer_transcoder",
                "feature_input_hook": "hook_resid_mid",
                "feature_output_hook": "hook_mlp_out",
                "model_name": name,
            },
            sort_keys=False,
        )
    )
    rows_per_chunk = max(1, (1 << 25) // (L * D))  # ~32M float32 values drawn at a time
    l0 = 0.0  # active features per token with the stored (rounded) weights, on the probe prompts
    for l in range(L):
        x = resid[l]
        W = (torch.randn(F, D, generator=genc) / x.norm(dim=-1).mean().clamp_min(1e-6)).to(disk_dtype)
        pre = (x @ W.float().T).flatten()  # b_enc = 0
        k = max(1, int(round((1 - frac) * pre.numel())))
        thr = pre.kthvalue(k).values.clamp_min(1e-4)
        thr_stored = float(thr.to(disk_dtype))
        l0 += float(((probe_resid[l] @ W.float().T) > thr_stored).sum(-1).float().mean())
        save_file(
            {
                f"W_enc_{l}": W.contiguous(),
                f"b_enc_{l}": torch.zeros(F, dtype=disk_dtype),
                f"b_dec_{l}": torch.zeros(D, dtype=disk_dtype),
                f"threshold_{l}": thr.expand(F).to(disk_dtype).contiguous(),
            },
            str(tmp / f"W_enc_{l}.safetensors"),
        )
        del W, pre
        n_out, sc = L - l, float(dec_scale[l])
        chunks = (
            torch.randn(min(rows_per_chunk, F - a), n_out, D, generator=gdec) * sc for a in range(0, F, rows_per_chunk)
        )
        _write_safetensors_streamed(tmp / f"W_dec_{l}.safetensors", f"W_dec_{l}", (F, n_out, D), disk_dtype, chunks)
        log(f"  CLT layer {l + 1}/{L} written ({time.perf_counter() - t0:.0f} s)")
    tmp.chmod(0o755)
    tmp.rename(clt_dir)
    n_dec = F * D * L * (L + 1) // 2
    info = {
        "spec": spec,
        "active_per_token_measured": l0,
        "decoder_values": n_dec,
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


def _git_commit() -> str | None:
    """The checkout's commit (what code the numbers belong to), or None outside a git checkout."""
    import subprocess

    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    # a batch's decoder rows (~1.2 GB per prompt at Llama-3.2-1B's shape) are a CPU run's memory
    # peak, and one thread gains nothing from batching: hence one prompt per batch there
    ps.add_common_args(
        p,
        batch_help="prompts per batch (default 16 on a GPU, 1 on a CPU)",
        dtype_help="model and CLT dtype (default bfloat16 on every device)",
    )
    p.set_defaults(n=16, batch_size=None, repeats=1, warmup=1)
    p.add_argument("--shape", choices=sorted(REAL_SHAPES), default="llama-3.2-1b")
    p.add_argument("--scale", type=int, default=1, help="divide layers (min 2), widths, vocab and features by this")
    p.add_argument("--active-per-token", type=float, default=300.0, help="CLT features firing per token (all layers)")
    p.add_argument(
        "--cache", default="~/.cache/pie_lib/real_scale", help="build folder (one subfolder per shape/scale)"
    )
    p.add_argument("--rebuild", action="store_true")
    p.add_argument("--build-only", action="store_true", help="build (or find) the world and stop")
    p.add_argument(
        "--rows-dtype",
        default=None,
        help="dtype of gathered decoder rows (default: float32, or the run dtype when it is bfloat16 on CPU)",
    )
    p.add_argument(
        "--model-backend",
        choices=("auto", "native", "hf"),
        default="auto",
        help="model modules: pie_lib's own (native), transformers' (hf), or auto (native for these folders)",
    )
    p.add_argument("--naive", action="store_true", help="also run the naive reference (slow; small --n only)")
    p.add_argument(
        "--results", default=None, help="folder for real_scale_<shape>_s<scale>_<device>.json (default: only --json)"
    )
    args = p.parse_args(argv)
    commit = _git_commit()  # now: the code this process imports, not whatever is checked out at the end
    ps.set_threads(args.threads)
    torch.manual_seed(args.seed)
    hw = ps.hardware()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    # bfloat16 on every device: the paper's precision, and on a CPU with AVX512-BF16 ~3x the float32
    # matmul speed at half the memory (the model and the CLT encoders are resident)
    dtype = args.dtype or "bfloat16"
    if args.batch_size is None:
        args.batch_size = 1 if device == "cpu" else 16
    sub = (
        args.shape
        + (f"-s{args.scale}" if args.scale > 1 else "")
        + (f"-a{args.active_per_token:g}" if args.active_per_token != 300 else "")
    )
    folder = Path(args.cache).expanduser() / sub
    model_dir, clt_dir, info = build_real_scale(
        folder,
        args.shape,
        args.scale,
        args.seed,
        args.active_per_token,
        device=device,
        calib_dtype=dtype,
        rebuild=args.rebuild,
    )
    if args.build_only:
        return info
    mem = ps.PeakMemory(device)
    load_log = ps.PhaseLog()
    t0 = time.perf_counter()
    with load_log.phase("load", device, mem):
        model = load_model(model_dir, device=device, dtype=dtype, backend=args.model_backend)
        clt = load_clt(clt_dir, device=model.device, dtype=getattr(torch, dtype))
    load_s = time.perf_counter() - t0
    model.check_clt(clt)
    batches = random_pair_batches(args.n, model.vocab_size, args.seed, args.batch_size)
    cfg = ps.bench_config(args, naive=args.naive)
    rows_dtype = args.rows_dtype or ("bfloat16" if dtype == "bfloat16" and device == "cpu" else "float32")
    cfg.scoring.rows_dtype = getattr(torch, rows_dtype)
    t_run = time.perf_counter()
    result = ps.run_benchmark(model, clt, batches, cfg)
    run_s = time.perf_counter() - t_run
    if args.profile:
        result["profile"] = ps.profile_pass(model, clt, batches, cfg)
    per_prompt = result["pie"]["seconds_per_prompt"]
    target = {k: per_prompt[k] * 500 / 60 for k in ("fap_total", "synergy", "ladder_total", "total")}
    peaks_mb = {**result["pie"]["peak_mb"], "load": load_log.peak_mb["load"]}
    result.update(
        # the exact command, so a re-run reproduces the memory peak (it depends on --batch-size)
        command=" ".join(["python", "benchmarks/real_scale.py", *(sys.argv[1:] if argv is None else argv)]),
        commit=commit,
        shape=args.shape,
        scale=args.scale,
        n=sum(b.size for b in batches),
        build=info,
        load_seconds=load_s,
        device=str(model.device),
        dtype=str(model.dtype).removeprefix("torch."),
        seconds_per_prompt=per_prompt,
        total_seconds=load_s + run_s,
        peak_memory_bytes=int(max(peaks_mb.values()) * 2**20),
        peak_memory_kind=mem.kind,
        peak_memory_mb_by_phase=peaks_mb,
        hardware=hw,
        projected_minutes_for_500_pairs=target,
        model_shape={
            "layers": model.n_layers,
            "d_model": model.d_model,
            "vocab": model.vocab_size,
            "clt_features_per_layer": clt.n_features,
            "params": sum(p.numel() for p in model.hf.parameters()),
            "decoder_values": info["decoder_values"],
        },
        config={
            "methods": cfg.methods,
            "k": cfg.k,
            "k_frac": cfg.k_frac,
            "syn_k": cfg.syn_k,
            "repeats": cfg.repeats,
            "warmup": cfg.warmup,
            "batch_size": args.batch_size,
            "chunk": args.chunk,
            "rows_dtype": rows_dtype,
            "threads": args.threads,
            "lazy_decoder": isinstance(clt.decoder.sources[0], SafetensorsRows),
            "model_backend": model.backend,
            "decoder_row_cache": not (clt.decoder.device_only_cache and clt.decoder.device.type == "cpu"),
            "mmap_threshold_pinned": bool(model.extra.get("mmap_threshold_pinned")),
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
    print(
        f"peak {'GPU memory allocated' if str(model.device).startswith('cuda') else 'RSS'}: "
        f"{result['peak_memory_bytes'] / 2**30:.2f} GiB (model + CLT load {load_s:.1f} s; CLT decoders "
        f"{'lazy (rows read from the files)' if result['config']['lazy_decoder'] else 'in memory'}; model backend "
        f"{model.backend}); total {result['total_seconds']:.1f} s"
    )
    json_path = args.json
    if args.results:
        json_path = str(Path(args.results) / f"real_scale_{args.shape}_s{args.scale}_{model.device.type}.json")
    return ps.finish(result, json_path, cfg.naive)


if __name__ == "__main__":
    main()
