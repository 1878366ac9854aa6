"""pie_lib.prune.related: Edge Pruning / HAP / ensembles on CLT occurrences, MIB metrics, PAHQ precision.

A tiny random Llama (initializer_range 0.3 so patching moves its logits) and a JumpReLU CLT whose
thresholds make ~15% of features fire; one batch of 4 equal-length pairs.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pie_lib.clt import load_clt, save_clt
from pie_lib.data.pairs import Pair, save_pairs
from pie_lib.engine.masked import last_token_kl
from pie_lib.engine.traces import patched_last_logits, run_with_cache
from pie_lib.errors import BudgetError
from pie_lib.models.loading import load_model
from pie_lib.models.random_init import save_random_model
from pie_lib.prune.context import BatchContext, ScoringConfig
from pie_lib.prune.occurrences import tokenize_pairs
from pie_lib.prune.params import MethodParams
from pie_lib.prune.registry import METHODS, get_methods

WORDS = [f"w{i}" for i in range(40)]
FAST = {"ep_steps": 4, "ep_warmup": 2}


@dataclass
class World:
    folder: Path
    model: object
    clt: object
    pairs_path: Path
    ctx: BatchContext


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny forwards are dominated by thread hand-offs on a shared machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def world(tmp_path_factory, one_thread) -> World:
    folder = tmp_path_factory.mktemp("related")
    save_random_model(folder / "model", "llama", WORDS, seed=0, initializer_range=0.3)
    model = load_model(folder / "model", device="cpu")
    r = random.Random(0)
    pairs = []
    for i in range(6):
        a = [r.choice(WORDS) for _ in range(6 + i % 2)]
        b = list(a)
        b[2], b[4] = r.choice(WORDS), r.choice(WORDS)
        io, s = r.sample(WORDS, 2)
        pairs.append(Pair(" ".join(a), " ".join(b), " " + io, " " + s))
    pairs_path = save_pairs(pairs, folder / "pairs.jsonl")
    cache = run_with_cache(model, torch.tensor(model.tokenize([p.text_clean for p in pairs[::2]])))
    L, D, F = model.n_layers, model.d_model, 32
    g = torch.Generator().manual_seed(0)
    W_enc = torch.randn(L, F, D, generator=g)
    pre = torch.einsum("lnd,lfd->lnf", cache.resid_mid[:, :, 1:].flatten(1, 2), W_enc)
    thr = torch.quantile(pre, 0.85, dim=1).clamp_min(1e-3)
    out_scale = cache.mlp_out.flatten(1, 2).norm(dim=-1).mean(-1)
    W_dec = [torch.randn(F, L - i, D, generator=g) * out_scale[i] / D**0.5 for i in range(L)]
    save_clt(folder / "clt", W_enc, torch.zeros(L, F), W_dec, torch.zeros(L, D), thr)
    clt = load_clt(folder / "clt")
    batch = tokenize_pairs(model, pairs[::2], batch_size=8).batches[0]
    return World(folder, model, clt, pairs_path, BatchContext(model, clt, batch, ScoringConfig()))


def counts_ok(ctx: BatchContext, keep: torch.Tensor, kv: torch.Tensor) -> bool:
    kept = torch.bincount(ctx.occ.prompt[keep], minlength=ctx.occ.n_prompts)
    return bool((kept == torch.minimum(kv, ctx.occ.counts())).all())


# ----------------------------------------------------------------------------- registry / config
def test_registry_exposes_all_names():
    from pie_lib.prune.related import RELATED_METHODS

    assert set(RELATED_METHODS) == {
        "edge-pruning",
        "edge-pruning-shared",
        "hap",
        "ensemble-mean",
        "ensemble-min",
        "ensemble-max",
        "ensemble-seq",
    }
    got = get_methods(",".join(RELATED_METHODS))
    assert [m.name for m in got] == list(RELATED_METHODS)
    assert all(name in METHODS for name in RELATED_METHODS)


def test_config_from_extra_types_and_errors():
    from pie_lib.prune.related.config import EnsembleConfig, HapConfig, MaskConfig, config_from_extra

    cfg = config_from_extra(MaskConfig, {"ep_steps": "7", "ep_lr": "0.5", "hap_mult": 2, "other": 1})
    assert cfg.steps == 7 and cfg.lr == 0.5 and cfg.warmup == MaskConfig().warmup
    assert config_from_extra(HapConfig, {"hap_mult": "2"}).mult == 2.0
    assert config_from_extra(HapConfig, {"hap_steps": "75"}).steps == 75
    assert config_from_extra(HapConfig, {"hap_steps": "none"}).steps is None
    assert config_from_extra(EnsembleConfig, {"ens_members": "fap, act-mag"}).members == ("fap", "act-mag")
    with pytest.raises(BudgetError, match="ep_steps"):
        config_from_extra(MaskConfig, {"ep_stpes": 3})


# ----------------------------------------------------------------------------- masks
def test_hard_concrete_distribution():
    from pie_lib.prune.related.masks import HardConcrete

    hc = HardConcrete()
    la = torch.tensor([10.0, 0.0, -10.0])
    u = torch.rand(2000, 3, generator=torch.Generator().manual_seed(0))
    z = hc.sample(la.expand(2000, 3), u)
    assert z.min() >= 0 and z.max() <= 1
    # empirical P(z > 0) matches the closed form
    assert torch.allclose((z > 0).float().mean(0), hc.p_open(la), atol=0.03)
    assert hc.p_open(torch.tensor(10.0)) > 0.999 and hc.deterministic(torch.tensor(10.0)) == 1


def test_delta_writer_matches_evaluator_and_is_differentiable(world):
    from pie_lib.engine.masked import masked_last_logits
    from pie_lib.prune.related.masks import DeltaWriter, frozen_parameters

    ctx = world.ctx
    N = len(ctx.occ)
    writer = DeltaWriter(ctx, torch.arange(N))
    coef = ctx.evaluator.delta.clone().requires_grad_(True)
    off = writer(coef)
    assert torch.allclose(off, ctx.evaluator.null_offsets(), atol=1e-4, rtol=1e-4)
    with frozen_parameters(ctx.model):
        logits = masked_last_logits(ctx.model, ctx.batch.clean_ids, off)
        logits.sum().backward()
    ref, _ = patched_last_logits(ctx.model, ctx.batch.clean_ids, ctx.evaluator.null_offsets())
    assert torch.allclose(logits, ref.float(), atol=1e-4)
    assert coef.grad is not None and coef.grad.abs().sum() > 0  # gradients reach the mask coefficients
    # weights are frozen at load (models.loading.freeze_weights) and stay so: no weight gradient
    assert all(p.grad is None and not p.requires_grad for p in ctx.model.hf.parameters())


def test_mask_objective_decreases(world):
    """Without sparsity pressure (λ fixed at 0), training from a half-removed mask lowers the KL;
    with the default schedule the expected density follows the target down."""
    from pie_lib.prune.related.config import MaskConfig
    from pie_lib.prune.related.masks import learn_masks

    ctx = world.ctx
    N, B = len(ctx.occ), ctx.occ.n_prompts
    cfg = MaskConfig(steps=40, lr=0.3, lambda_lr=0.0, warmup=0)
    res = learn_masks(ctx, torch.arange(N), torch.arange(N), torch.zeros(N), torch.full((B,), 0.5), cfg, seed=0)
    obj = np.array(res.history["objective"])
    assert obj[-8:].mean() < 0.7 * obj[:8].mean()
    assert not any(p.requires_grad for p in ctx.model.hf.parameters())  # still frozen after the block
    assert all(p.grad is None for p in ctx.model.hf.parameters())

    cfg = MaskConfig(steps=60, warmup=30)
    res = learn_masks(ctx, torch.arange(N), torch.arange(N), torch.full((N,), 10.0), torch.full((B,), 0.2), cfg, seed=0)
    dens, tgt = np.array(res.history["density"]), np.array(res.history["target"])
    assert dens[0] > 0.99 and dens[-1] < 0.5 and tgt[-1] == pytest.approx(0.2)


@pytest.mark.parametrize(
    "name",
    ["edge-pruning", "edge-pruning-shared", "hap", "ensemble-seq", "ensemble-mean", "ensemble-min", "ensemble-max"],
)
def test_binarisation_hits_k_exactly(world, name):
    ctx = world.ctx
    B = ctx.occ.n_prompts
    n = ctx.occ.counts()
    params = MethodParams(extra=dict(FAST))
    sel = METHODS[name].select
    for k in (3, torch.tensor([1, 5, 9][:B]), torch.tensor([int(x) + 5 for x in n]), 10_000):
        kv = k if torch.is_tensor(k) else torch.full((B,), k)
        keep, scores = sel(ctx, k, 0, params)
        assert keep.dtype == torch.bool and keep.shape == (len(ctx.occ),) and scores.shape == (len(ctx.occ),)
        assert counts_ok(ctx, keep, kv), (name, k)
        assert torch.isfinite(scores).all()


def test_mask_methods_are_seeded_and_deterministic(world):
    ctx = world.ctx
    params = MethodParams(extra=dict(FAST))
    a, sa = METHODS["edge-pruning"].select(ctx, 4, 0, params)
    b, sb = METHODS["edge-pruning"].select(ctx, 4, 0, params)
    assert torch.equal(a, b) and torch.equal(sa, sb)
    assert METHODS["edge-pruning"].seeded and METHODS["hap"].seeded


def test_hap_pool_and_timings(world):
    from pie_lib.prune.methods import fap
    from pie_lib.prune.related.config import HapConfig
    from pie_lib.prune.related.masks import clear_mask_timings, mask_timings
    from pie_lib.prune.related.selectors import hap_pool
    from pie_lib.prune.select import topk_global

    ctx = world.ctx
    B = ctx.occ.n_prompts
    kv = torch.full((B,), 3)
    in_pool, m = hap_pool(ctx, kv, HapConfig(mult=4, min_pool=5))
    assert torch.equal(m, torch.minimum(torch.full((B,), 12), ctx.occ.counts()))
    assert torch.equal(in_pool, topk_global(ctx.occ, fap(ctx), 12))
    clear_mask_timings()
    keep, _ = METHODS["hap"].select(ctx, 3, 0, MethodParams(extra={**FAST, "hap_mult": 4, "hap_min_pool": 5}))
    assert not (keep & ~in_pool).any()  # HAP only keeps prescreened occurrences
    METHODS["edge-pruning"].select(ctx, 3, 0, MethodParams(extra=dict(FAST)))
    METHODS["hap"].select(ctx, 3, 0, MethodParams(extra={**FAST, "hap_steps": 2, "hap_warmup": 1}))
    t = mask_timings()
    assert list(t.method) == ["hap", "edge-pruning", "hap"] and list(t.steps) == [4, 4, 2]
    assert t.n_units.iloc[0] == int(m.sum()) and t.n_fixed_removed.iloc[0] == len(ctx.occ) - int(m.sum())
    assert t.n_units.iloc[1] == len(ctx.occ) and (t.seconds > 0).all()


def test_shared_mask_units(world):
    from pie_lib.prune.related.selectors import shared_units

    ctx = world.ctx
    occ, F, T = ctx.occ, ctx.clt.n_features, ctx.batch.seq_len
    units, unit_of = shared_units(ctx, "layer-feature")
    assert torch.equal(units[unit_of], occ.layer * F + occ.feat)
    assert units.numel() < len(occ)  # the same (layer, feature) recurs across prompts/positions
    units2, unit_of2 = shared_units(ctx)  # default: (layer, position from the end, feature)
    assert torch.equal(units2[unit_of2], (occ.layer * F + occ.feat) * T + (T - 1 - occ.pos))
    assert units.numel() < units2.numel() < len(occ)
    with pytest.raises(BudgetError, match="ep_share"):
        METHODS["edge-pruning-shared"].select(ctx, 3, 0, MethodParams(extra={"ep_share": "nope"}))


# ----------------------------------------------------------------------------- ensembles
@pytest.mark.parametrize("member", ["fap", "act-mag", "clt-relp", "fap-synergy"])
@pytest.mark.parametrize("how", ["mean", "min", "max"])
def test_ensemble_of_one_equals_member(world, member, how):
    ctx = world.ctx
    params = MethodParams(extra={"ens_members": member})
    for k in (2, 7, torch.tensor([1, 3, 50][: ctx.occ.n_prompts])):
        want, _ = METHODS[member].select(ctx, k, 0, params)
        got, _ = METHODS[f"ensemble-{how}"].select(ctx, k, 0, params)
        assert torch.equal(got, want), (member, how, k)


def test_ensemble_combinations_and_errors(world):
    from pie_lib.prune.related.selectors import ensemble_combine, member_ranks

    ctx = world.ctx
    ranks = member_ranks(ctx, ("fap", "act-mag"), 4, 0, MethodParams())
    assert ranks.shape == (2, len(ctx.occ)) and ranks.min() >= 0 and ranks.max() <= 1
    # every prompt has exactly one best (rank 1) occurrence per member
    assert torch.equal(
        torch.bincount(ctx.occ.prompt[ranks[0] == 1], minlength=ctx.occ.n_prompts), (ctx.occ.counts() > 0).long()
    )
    assert torch.equal(ensemble_combine(ranks, "min"), torch.minimum(ranks[0], ranks[1]))
    with pytest.raises(BudgetError, match="unknown ensemble member"):
        METHODS["ensemble-mean"].select(ctx, 3, 0, MethodParams(extra={"ens_members": "nope"}))
    with pytest.raises(BudgetError, match="ensembles cannot contain"):
        METHODS["ensemble-max"].select(ctx, 3, 0, MethodParams(extra={"ens_members": "ensemble-mean"}))


def test_ensemble_seq_warm_start_is_fap_order(world):
    """With zero training steps the sequential ensemble is exactly FAP's selection."""
    ctx = world.ctx
    params = MethodParams(extra={"ep_steps": 0, "ep_init_std": 0.0})
    for k in (2, 6):
        want, _ = METHODS["fap"].select(ctx, k, 0, params)
        got, _ = METHODS["ensemble-seq"].select(ctx, k, 0, params)
        assert torch.equal(got, want)


# ----------------------------------------------------------------------------- MIB metrics
def _mib_table() -> pd.DataFrame:
    # method A, one prompt: sizes 0.25 / 0.5 with f 0.5 / 1.0; method B, two prompts.
    rows = [
        ("A", 1, "abs", 0, 0, 4, 1, 0.5),
        ("A", 2, "abs", 0, 0, 4, 2, 1.0),
        ("B", 1, "abs", 0, 0, 4, 1, 0.0),
        ("B", 4, "abs", 0, 0, 4, 4, 1.0),
        ("B", 1, "abs", 0, 1, 2, 1, 2.0),
        ("B", 0.5, "frac", 0, 1, 2, 1, 1.0),  # same size twice -> mean 1.5
        ("B", 9, "abs", 0, 2, 2, 2, float("nan")),  # NaN faithfulness is dropped
    ]
    return pd.DataFrame(
        rows, columns=["method", "k", "budget", "seed", "prompt_idx", "n_active", "k_eff", "faithfulness"]
    )


def test_cpr_cmd_hand_computed():
    from pie_lib.prune.related.mib import cpr_cmd, curve_areas, faithfulness_curve

    df = _mib_table()
    out = cpr_cmd(df).set_index("method")
    # A: points (0,0) (.25,.5) (.5,1) (1,1): CPR = .0625 + .1875 + .5 = .75; CMD = |1-f|: 1,.5,0,0 -> .1875 + .0625 = .25
    assert out.loc["A", "cpr"] == pytest.approx(0.75)
    assert out.loc["A", "cmd"] == pytest.approx(0.25)
    # B prompt 0: (0,0) (.25,0) (1,1): CPR = .375, CMD = .25 + .375 = .625
    # B prompt 1: (0,0) (.5,1.5) (1,1): CPR = .375 + .625 = 1.0; CMD = .5·(1+.5)/2 + .5·(.5+0)/2 = .5
    assert out.loc["B", "cpr"] == pytest.approx((0.375 + 1.0) / 2)
    assert out.loc["B", "cmd"] == pytest.approx((0.625 + 0.5) / 2)
    assert out.loc["B", "n_curves"] == 2
    assert out.loc["B", "cpr_std"] == pytest.approx(np.std([0.375, 1.0], ddof=1))
    # no anchors: A covers only [.25, .5]
    assert cpr_cmd(df, anchors=False).set_index("method").loc["A", "cpr"] == pytest.approx(0.25 * 0.75)
    assert curve_areas(np.array([0.5]), np.array([1.0]), anchors=True, f_null=0.0, f_full=1.0) == pytest.approx(
        (0.75, 0.25)
    )
    # aggregate curve of ladder means
    curve = faithfulness_curve(df)
    a = curve[curve.method == "A"]
    assert list(a.size_frac) == [0.25, 0.5] and list(a.faithfulness) == [0.5, 1.0]
    assert cpr_cmd(df, level="mean").set_index("method").loc["A", "cpr"] == pytest.approx(0.75)
    assert len(faithfulness_curve(df, by_prompt=True)) == 6


# ----------------------------------------------------------------------------- PAHQ
def test_pahq_precision_close_and_restores_weights(world):
    from pie_lib.prune.patching import Variants
    from pie_lib.prune.related.pahq import pahq_patched_last_logits, pahq_run, reduced_precision, source_layers

    ctx = world.ctx
    model = ctx.model
    before = {k: v.clone() for k, v in model.hf.state_dict().items()}
    ids, off = ctx.batch.clean_ids, ctx.evaluator.null_offsets()
    ref, _ = patched_last_logits(model, ids, off)
    low, _ = pahq_patched_last_logits(model, ids, off, [1])
    assert low.dtype == torch.float32
    err = last_token_kl(ref.float(), low)
    assert (err < 1e-2).all() and not torch.equal(low, ref)  # bf16 differs, but barely
    full, _ = pahq_patched_last_logits(model, ids, off, range(model.n_layers))
    assert torch.equal(full, ref.float())
    with reduced_precision(model, [0]) as reduced:
        assert reduced == list(range(1, model.n_layers))
        layers = model.hf.model.layers
        assert layers[1].mlp.down_proj.weight.dtype == torch.bfloat16
        assert layers[0].mlp.down_proj.weight.dtype == torch.float32
    after = model.hf.state_dict()
    assert all(torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype for k in before)
    assert source_layers(ctx.occ) == sorted(set(ctx.occ.layer.tolist()))
    singles = Variants.singles(ctx.occ.prompt[:4], torch.arange(4))
    res, res_fp = pahq_run(ctx.evaluator, singles), ctx.evaluator.run(singles)
    assert torch.allclose(res.metric, res_fp.metric, atol=0.05)


# ----------------------------------------------------------------------------- end to end
def test_run_prune_end_to_end(world, tmp_path):
    from pie_lib.prune.related import RELATED_METHODS, cpr_cmd
    from pie_lib.prune.related.masks import clear_mask_timings, mask_timings
    from pie_lib.prune.sweep import PruneConfig, run_prune

    clear_mask_timings()
    methods = ["fap", *RELATED_METHODS]
    cfg = PruneConfig(
        model=str(world.folder / "model"),
        clt=str(world.folder / "clt"),
        data=str(world.pairs_path),
        n=4,
        methods=methods,
        k=[3, 1000],
        k_frac=[0.5],
        seeds=[0],
        out=str(tmp_path / "out"),
        batch_size=8,
        progress=False,
        params=MethodParams(extra=dict(FAST)),
    )
    with pytest.warns(UserWarning, match="clipped"):
        df = run_prune(cfg, model=world.model, clt=world.clt)
    assert set(df.method) == set(methods)
    assert len(df) == len(methods) * 3 * 4
    assert (df.n_kept == df.k_eff).all()
    full = df[df.k == 1000]
    # keeping everything = the clean run (compare metrics: the faithfulness ratio is ill-conditioned
    # when m_clean is close to m_null)
    assert np.allclose(full.m_circuit, full.m_clean, atol=1e-4, rtol=1e-4) and (full.kl < 1e-5).all()
    ok = (full.m_clean - full.m_null).abs() > 0.1
    assert np.allclose(full.faithfulness[ok], 1.0, atol=1e-3)
    out = cpr_cmd(df)
    assert set(out.method) == set(methods) and out.cpr.notna().all()
    t = mask_timings()
    assert {"edge-pruning", "edge-pruning-shared", "hap", "ensemble-seq"} <= set(t.method)
