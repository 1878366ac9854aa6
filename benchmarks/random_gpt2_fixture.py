"""A random GPT-2 + CLT fixture of any shape, for ``vs_reference.py`` beyond the toy world.

The model is a randomly initialised ``GPT2LMHeadModel`` (``pie_lib.models.random_init``) with the
toy GPT-2's tokenizer, so ``generate_task`` makes the same kind of IOI / Doc-String pairs; MLP
width is 4 x d_model and ``n_positions`` 128, as the reference harness needs (TransformerLens
rebuilds GPT-2 from the config). The CLT is a random JumpReLU CLT in circuit-tracer format whose
thresholds are calibrated on the fixture's own prompts (the pre-activation quantile that leaves
``--active-per-token`` features per token, over all layers), with decoders scaled so the summed
writes are about the size of a real MLP output. Nothing is trained: the fixture exercises the
code paths and costs of a model of this shape, not interpretable circuits.

Example::

    python benchmarks/random_gpt2_fixture.py --out /tmp/rgpt2 --layers 6 --d-model 128 --heads 4 --features 1024
    python benchmarks/vs_reference.py --model /tmp/rgpt2/model --clt /tmp/rgpt2/clt --n 100 \\
        --json benchmarks/results/vs_reference_random_gpt2_6x128.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch


def build(
    out: Path, layers: int, d_model: int, heads: int, features: int, active_per_token: float, task: str, seed: int
) -> dict:
    from transformers import AutoTokenizer

    from pie_lib import toy
    from pie_lib.clt import save_clt
    from pie_lib.data.tasks import generate_task
    from pie_lib.engine.traces import run_with_cache
    from pie_lib.models.loading import load_model
    from pie_lib.models.random_init import random_model

    tok = AutoTokenizer.from_pretrained(str(toy.toy_model_path("gpt2")))
    hf = random_model(
        "gpt2",
        vocab_size=len(tok),
        seed=seed,
        n_embd=d_model,
        n_layer=layers,
        n_head=heads,
        n_positions=128,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    model_dir = out / "model"
    hf.save_pretrained(model_dir)
    tok.save_pretrained(str(model_dir))
    model = load_model(model_dir, device="cpu", dtype="float32")
    # calibrate on prompts of the task (other seeds than the benchmark's pairs)
    pairs = generate_task(task, tok, 32, seed=seed + 1000).pairs
    texts = [p.text_clean for p in pairs] + [p.text_corr for p in pairs]
    ids = model.tokenize(texts)
    T = min(len(i) for i in ids)
    cache = run_with_cache(model, torch.tensor([i[:T] for i in ids]))
    L, D, F = layers, d_model, features
    resid = cache.resid_mid[:, :, 1:].flatten(1, 2)  # [L, tokens, D], BOS excluded
    out_scale = cache.mlp_out[:, :, 1:].flatten(1, 2).norm(dim=-1).mean(-1)  # [L]
    g = torch.Generator().manual_seed(seed)
    W_enc = torch.randn(L, F, D, generator=g) / resid.norm(dim=-1).mean(-1)[:, None, None]
    pre = torch.einsum("lnd,lfd->lnf", resid, W_enc)
    per_layer = max(active_per_token / L, 0.5)
    thr = torch.quantile(pre.flatten(1), 1 - per_layer / F, dim=1)[:, None].expand(L, F).clamp_min(1e-3).contiguous()
    dec_scale = out_scale / math.sqrt(D * per_layer)
    W_dec = [torch.randn(F, L - i, D, generator=g) * dec_scale[i] for i in range(L)]
    save_clt(out / "clt", W_enc, torch.zeros(L, F), W_dec, torch.zeros(L, D), thr, model_name="gpt2")
    active = float((pre > thr[:, None, :]).sum(dim=(0, 2)).float().mean())
    info = {
        "layers": L,
        "d_model": D,
        "heads": heads,
        "d_mlp": 4 * D,
        "features": F,
        "vocab": len(tok),
        "task": task,
        "seed": seed,
        "active_per_token_target": active_per_token,
        "active_per_token_measured": active,
        "calibration_tokens": int(resid.shape[1]),
    }
    (out / "fixture.json").write_text(json.dumps(info, indent=2))
    return info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--features", type=int, default=1024, help="CLT features per layer")
    p.add_argument("--active-per-token", type=float, default=48.0, help="active CLT features per token, all layers")
    p.add_argument("--task", default="ioi", choices=("ioi", "docstring"), help="calibration prompts")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.d_model % a.heads:
        raise SystemExit(f"--d-model {a.d_model} is not a multiple of --heads {a.heads}")
    torch.set_num_threads(1)
    info = build(a.out, a.layers, a.d_model, a.heads, a.features, a.active_per_token, a.task, a.seed)
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
