"""Rebuild the embedded toy world: ``python -m pie_lib.toy.build [--out DIR] [--arch llama,gpt2]``.

For each arch: train the tiny LM on the synthetic corpus, save it (safetensors) with the
tokenizer, measure held-out IOI / Doc-String accuracy, collect ``hook_resid_mid`` /
``hook_mlp_out`` activations, train a JumpReLU CLT, save it in circuit-tracer format, reload it
and measure per-layer FVU and L0 on held-out text, and the size of each prompt's active set.
Everything is seeded and deterministic; numbers go to ``toy_world.json`` and stdout.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, Sequence, cast

import torch

from pie_lib.store import write_text
from pie_lib.toy import ARCHS, SUMMARY_FILE, TOY_ROOT
from pie_lib.toy.corpus import (
    heldout_docstring_pairs,
    heldout_ioi_pairs,
    heldout_texts,
    training_texts,
    vocabulary_texts,
)
from pie_lib.toy.tokenizer import build_tokenizer
from pie_lib.toy.train_clt import (
    CLTTrainConfig,
    collect_activations,
    corpus_activations,
    evaluate_clt,
    save_trained_clt,
    train_clt,
)
from pie_lib.toy.train_lm import DEFAULT_STEPS, Arch, LMConfig, task_accuracy, train_lm

#: Seeds of the evaluation data (disjoint from the training seeds).
EVAL_SEED = 1234
N_EVAL_PAIRS = 500
N_EVAL_TEXTS = 300
N_ACTIVE_PAIRS = 50


def folder_bytes(folder: Path) -> int:
    """Total size of the files under ``folder``."""
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


@torch.no_grad()
def active_occurrences(model: Any, tokenizer: Any, clt: Any, pairs: Sequence[Any]) -> list[int]:
    """Per pair: number of occurrences (layer, position > 0, feature) active in clean OR corrupted.

    Each pair is one ``[2, T]`` batch (clean and corrupted have equal token length).
    """
    counts = []
    for p in pairs:
        batch = tokenizer([p.text_clean, p.text_corr], return_tensors="pt", padding=True)
        x, _, _ = collect_activations(model, batch["input_ids"], batch["attention_mask"])  # [L, 2, T, D]
        acts = clt.encode(x)[:, :, 1:]  # [L, 2, T-1, F], BOS excluded
        counts.append(int(((acts[:, 0] != 0) | (acts[:, 1] != 0)).sum()))
    return counts


def build_arch(arch: str, tokenizer: Any, out: Path, lm_cfg: LMConfig, clt_cfg: CLTTrainConfig) -> dict:
    """Train, save and measure one arch; returns its ``toy_world.json`` entry."""
    from transformers import AutoModelForCausalLM

    from pie_lib.clt import load_clt

    t0 = time.time()
    ioi_eval = heldout_ioi_pairs(tokenizer, N_EVAL_PAIRS, seed=EVAL_SEED).pairs
    doc_eval = heldout_docstring_pairs(tokenizer, N_EVAL_PAIRS, seed=EVAL_SEED).pairs
    probe = {"ioi": ioi_eval[:100], "doc": doc_eval[:100]}
    model, lm_stats = train_lm(
        cast(Arch, arch),  # main() refuses names outside ARCHS
        tokenizer,
        lm_cfg,
        eval_fn=lambda m: {k: task_accuracy(m, tokenizer, v) for k, v in probe.items()},  # type: ignore[arg-type]
    )
    model_dir, clt_dir = out / arch / "model", out / arch / "clt"
    model.save_pretrained(str(model_dir))
    tokenizer.save_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()  # measure what ships
    ioi_acc = task_accuracy(model, tokenizer, ioi_eval)
    doc_acc = task_accuracy(model, tokenizer, doc_eval)
    print(f"  [{arch}] held-out IOI acc {ioi_acc:.3f}  Doc-String acc {doc_acc:.3f}", flush=True)

    texts, _ = training_texts(clt_cfg.n_train_texts, seed=clt_cfg.seed + 777)
    x, y = corpus_activations(model, tokenizer, texts)
    weights, clt_stats = train_clt(x, y, clt_cfg, tag=arch)
    del x, y
    save_trained_clt(clt_dir, weights, model_name=f"pie_lib.toy:{arch}")
    _make_readable(clt_dir)  # save_clt writes through a private temp folder (mode 0700)
    clt = load_clt(clt_dir)
    xe, ye = corpus_activations(model, tokenizer, heldout_texts(N_EVAL_TEXTS, seed=EVAL_SEED))
    fvus, l0s = evaluate_clt(clt, xe, ye)
    active = active_occurrences(model, tokenizer, clt, ioi_eval[:N_ACTIVE_PAIRS])
    conf = model.config
    return {
        "n_layers": clt.n_layers,
        "d_model": clt.d_model,
        "n_features": clt.n_features,
        "n_heads": conf.num_attention_heads if arch == "llama" else conf.n_head,
        "vocab_size": len(tokenizer),
        "n_params": sum(p.numel() for p in model.parameters()),
        "ioi_acc": round(ioi_acc, 4),
        "docstring_acc": round(doc_acc, 4),
        "n_eval_pairs": N_EVAL_PAIRS,
        "fvu": [round(v, 4) for v in fvus],
        "l0": [round(v, 2) for v in l0s],
        "n_eval_tokens": int(xe.shape[1]),
        "ioi_active_occurrences_mean": round(sum(active) / len(active), 1),
        "ioi_active_occurrences_min": min(active),
        "ioi_active_occurrences_max": max(active),
        "lm_train_steps": lm_stats["train_steps"],
        "lm_final_loss": lm_stats["final_loss"],
        "clt_train_steps": clt_stats["train_steps"],
        "clt_train_tokens": clt_stats["n_train_tokens"],
        "seeds": {"lm": lm_cfg.seed, "clt": clt_cfg.seed, "eval": EVAL_SEED},
        "lm_config": {k: v for k, v in asdict(lm_cfg).items()},
        "clt_config": asdict(clt_cfg),
        "model_bytes": folder_bytes(model_dir),
        "clt_bytes": folder_bytes(clt_dir),
        "wall_seconds": round(time.time() - t0, 1),
    }


def _make_readable(folder: Path) -> None:
    folder.chmod(0o755)
    for f in folder.iterdir():
        f.chmod(0o644)


def _add_config_flags(p: argparse.ArgumentParser, cls: type, prefix: str) -> None:
    for f in fields(cls):
        if f.type in (int, float, "int", "float", "int | None"):
            typ = float if f.type in (float, "float") else int
            p.add_argument(f"--{prefix}-{f.name.replace('_', '-')}", type=typ, default=None, dest=f"{prefix}_{f.name}")


def _config_from(ns: argparse.Namespace, cls: type, prefix: str) -> Any:
    cfg = cls()
    for f in fields(cls):
        v = getattr(ns, f"{prefix}_{f.name}", None)
        if v is not None:
            setattr(cfg, f.name, v)
    return cfg


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pie_lib.toy.build", description=(__doc__ or "").splitlines()[0])
    p.add_argument("--out", type=Path, default=TOY_ROOT, help=f"assets folder (default {TOY_ROOT})")
    p.add_argument("--arch", default=",".join(ARCHS), help="comma-separated subset of " + ",".join(ARCHS))
    p.add_argument(
        "--threads",
        type=int,
        default=2,
        help="torch threads (results are bitwise identical for 1 or 2; on a busy shared machine 1 is often faster)",
    )
    _add_config_flags(p, LMConfig, "lm")
    _add_config_flags(p, CLTTrainConfig, "clt")
    ns = p.parse_args(argv)
    archs = [a.strip() for a in ns.arch.split(",") if a.strip()]
    bad = [a for a in archs if a not in ARCHS]
    if bad:
        p.error(f"unknown arch {bad}; valid archs are {', '.join(ARCHS)}")
    lm_cfg, clt_cfg = _config_from(ns, LMConfig, "lm"), _config_from(ns, CLTTrainConfig, "clt")

    torch.set_num_threads(ns.threads)
    torch.use_deterministic_algorithms(True)
    out: Path = ns.out
    out.mkdir(parents=True, exist_ok=True)
    summary_path = out / SUMMARY_FILE
    summary: dict = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    summary.setdefault("archs", {})

    t0 = time.time()
    tokenizer = build_tokenizer(vocabulary_texts())
    for arch in archs:
        print(
            f"== {arch}: training LM ({lm_cfg.steps or DEFAULT_STEPS[arch]} steps) and CLT ({clt_cfg.steps} steps)",
            flush=True,
        )
        summary["archs"][arch] = build_arch(arch, tokenizer, out, lm_cfg, clt_cfg)
    summary["total_bytes"] = sum(folder_bytes(out / a) for a in ARCHS if (out / a).exists())
    summary["last_build"] = {
        "archs": archs,
        "wall_seconds": round(time.time() - t0, 1),
        "threads": ns.threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    write_text(summary_path, json.dumps(summary, indent=2))
    summary_path.chmod(0o644)

    print(
        f"\n{'arch':6s} {'IOI':>6s} {'DocStr':>6s}  {'FVU per layer':28s} {'L0 per layer':28s} {'active/pair':>11s} {'MB':>5s}"
    )
    for arch in archs:
        r = summary["archs"][arch]
        print(
            f"{arch:6s} {r['ioi_acc']:6.3f} {r['docstring_acc']:6.3f}  "
            f"{' '.join(f'{v:.3f}' for v in r['fvu']):28s} {' '.join(f'{v:.1f}' for v in r['l0']):28s} "
            f"{r['ioi_active_occurrences_mean']:11.1f} {(r['model_bytes'] + r['clt_bytes']) / 1e6:5.2f}"
        )
    print(
        f"total assets {summary['total_bytes'] / 1e6:.2f} MB; wall time {time.time() - t0:.0f}s; wrote {summary_path}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
