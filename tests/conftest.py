"""Shared fixtures: tiny random models of every architecture with a CLT that fires on them."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from pie_lib.clt import load_clt, save_clt
from pie_lib.data.pairs import Pair, save_pairs
from pie_lib.engine.traces import run_with_cache
from pie_lib.models.loading import load_model
from pie_lib.models.random_init import save_random_model

WORDS = [f"w{i}" for i in range(40)]


@dataclass
class TinyWorld:
    folder: Path
    model_dir: Path
    clt_dir: Path
    pairs_path: Path
    pairs: list
    model: object
    clt: object


def make_pairs(n: int, seed: int = 0) -> list[Pair]:
    r = random.Random(seed)
    pairs = []
    for i in range(n):
        length = 6 + (i % 2)
        a = [r.choice(WORDS) for _ in range(length)]
        b = list(a)
        b[2], b[4] = r.choice(WORDS), r.choice(WORDS)
        io, s = r.sample(WORDS, 2)
        pairs.append(Pair(" ".join(a), " ".join(b), " " + io, " " + s))
    return pairs


def build_world(folder: Path, arch: str, n_features: int = 48, active_frac: float = 0.1, seed: int = 0) -> TinyWorld:
    """A random ``arch`` model and a JumpReLU CLT whose thresholds make ~active_frac of features fire."""
    model_dir = save_random_model(folder / "model", arch, WORDS, seed=seed)
    model = load_model(model_dir, device="cpu", backend="hf")  # the shared worlds steer (generate): transformers
    pairs = make_pairs(8, seed)
    ids = torch.tensor(model.tokenize([p.text_clean for p in pairs if len(p.text_clean.split()) == 6]))
    cache = run_with_cache(model, ids)
    L, D = model.n_layers, model.d_model
    g = torch.Generator().manual_seed(seed)
    scale = cache.resid_mid.flatten(1, 2).norm(dim=-1).mean(-1)  # [L]
    W_enc = torch.randn(L, n_features, D, generator=g) / scale[:, None, None]
    pre = torch.einsum("lnd,lfd->lnf", cache.resid_mid[:, :, 1:].flatten(1, 2), W_enc)
    thr = torch.quantile(pre, 1 - active_frac, dim=1).clamp_min(1e-3)
    out_scale = cache.mlp_out.flatten(1, 2).norm(dim=-1).mean(-1)
    W_dec = [torch.randn(n_features, L - i, D, generator=g) * out_scale[i] / D**0.5 for i in range(L)]
    clt_dir = save_clt(folder / "clt", W_enc, torch.zeros(L, n_features), W_dec, torch.zeros(L, D), thr)
    pairs_path = save_pairs(pairs, folder / "pairs.jsonl")
    return TinyWorld(folder, model_dir, clt_dir, pairs_path, pairs, model, load_clt(clt_dir))


@pytest.fixture(scope="session")
def tiny_worlds(tmp_path_factory) -> dict[str, TinyWorld]:
    root = tmp_path_factory.mktemp("tiny")
    return {arch: build_world(root / arch, arch) for arch in ("llama", "gemma2", "gpt2")}


@pytest.fixture(scope="session")
def llama_world(tiny_worlds) -> TinyWorld:
    return tiny_worlds["llama"]


@pytest.fixture(scope="module")
def one_torch_thread():
    """2 shared cores: torch's intra-op threads oversubscribe and make tiny matmuls ~100x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def interp_world(tmp_path_factory):
    """(model folder, CLT folder, loaded model, loaded CLT) of the interpret/FADE tests' tiny world."""
    from fake_llm_server import build_tiny_world

    from pie_lib.interpret.pipeline import resolve_world

    m, c = build_tiny_world(tmp_path_factory.mktemp("world"))
    lm, clt, _ = resolve_world(str(m), str(c), device="cpu", model_backend="hf")  # FADE steers: transformers
    return m, c, lm, clt


def patch_evaluator(ctx, reuse: bool = True, chunk: int | None = None):
    """A fresh ``PatchEvaluator`` of a ``BatchContext``'s batch (corrupted deltas, logit_diff), so a
    test compares evaluators that differ only in ``reuse_prefix`` / ``chunk``."""
    from pie_lib.prune.patching import PatchEvaluator

    return PatchEvaluator(
        ctx.model, ctx.clt, ctx.batch, ctx.occ, ctx.rows, "corrupted", "logit_diff", ctx.evaluator.clean_logits,
        chunk=chunk, reuse_prefix=reuse,
    )  # fmt: skip
