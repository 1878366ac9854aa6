"""Methods beyond the paper (issue #17): FAP-IG, FAP-iterative, greedy-refine, and their engine."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import pie_lib.prune.beyond  # noqa: F401  (registers the methods)
from pie_lib.engine.attribution import count_forwards, patched_mlp_out_gradients, path_alphas, path_mlp_out_gradients
from pie_lib.engine.traces import mlp_out_gradients
from pie_lib.errors import BudgetError, SettingError
from pie_lib.prune.beyond import (
    IgConfig,
    IterativeConfig,
    RefineConfig,
    fap_ig_scores,
    iterative_select,
    refine_circuits,
)
from pie_lib.prune.beyond.iterative import survivors
from pie_lib.prune.context import BatchContext, ScoringConfig
from pie_lib.prune.methods import fap
from pie_lib.prune.occurrences import tokenize_pairs
from pie_lib.prune.params import MethodParams
from pie_lib.prune.patching import PatchEvaluator
from pie_lib.prune.registry import METHODS, get_methods
from pie_lib.prune.retention import evaluate_keep_masks
from pie_lib.prune.scores import factp_scores, fap_scores
from pie_lib.prune.select import rank_within, topk_global
from pie_lib.prune.sweep import PruneConfig, load_selections, run_prune


@pytest.fixture(scope="module")
def batch(llama_world):
    return tokenize_pairs(llama_world.model, llama_world.pairs, batch_size=3).batches[0]


def _ctx(world, batch, gradient="replacement"):
    return BatchContext(world.model, world.clt, batch, ScoringConfig(gradient=gradient))


# ----------------------------------------------------------------------------- engine
@pytest.mark.parametrize("mode", ["replacement", "full"])
def test_patched_gradient_at_zero_offsets_is_the_clean_gradient(llama_world, batch, mode, one_torch_thread):
    m = llama_world.model
    g0, m0 = mlp_out_gradients(m, batch.clean_ids, batch.correct, batch.wrong, "logit_diff", mode)
    g1, m1 = patched_mlp_out_gradients(
        m, batch.clean_ids, torch.zeros_like(g0), batch.correct, batch.wrong, "logit_diff", mode
    )
    torch.testing.assert_close(g1, g0.float())
    torch.testing.assert_close(m1, m0)


def test_path_runs_every_point_in_one_pass_and_splitting_changes_nothing(llama_world, batch, one_torch_thread):
    ctx = _ctx(llama_world, batch)
    null = ctx.evaluator.null_offsets()
    a = path_alphas(5)
    with count_forwards(ctx.model) as c:
        pg = path_mlp_out_gradients(ctx.model, batch.clean_ids, null, batch.correct, batch.wrong, a)
    assert c.calls == 1 and c.n == 5 * batch.size  # all steps of all prompts: one forward + backward
    split = path_mlp_out_gradients(ctx.model, batch.clean_ids, null, batch.correct, batch.wrong, a, max_rows=4)
    torch.testing.assert_close(split.mean, pg.mean, rtol=1e-5, atol=1e-7)
    # the path ends at the clean run and starts next to the null (everything removed)
    torch.testing.assert_close(pg.metric[-1], ctx.evaluator.clean_metric(), rtol=1e-5, atol=1e-5)
    with pytest.raises(SettingError):
        path_alphas(0)


# ----------------------------------------------------------------------------- FAP-IG
@pytest.mark.parametrize("mode", ["replacement", "full"])
def test_fap_ig_with_one_step_at_the_clean_end_equals_fap(llama_world, batch, mode, one_torch_thread):
    ctx = _ctx(llama_world, batch, mode)
    ig = fap_ig_scores(ctx, IgConfig(steps=1))
    torch.testing.assert_close(ig, fap(ctx), rtol=1e-5, atol=1e-7)
    # and with more steps it is a different ranking (the test can fail)
    assert not torch.allclose(fap_ig_scores(ctx, IgConfig(steps=8)), fap(ctx), rtol=1e-3, atol=1e-6)


def test_fap_ig_full_gradient_is_complete(llama_world, batch, one_torch_thread):
    """IG completeness: with the true gradient, a prompt's scores sum to m_clean - m_null."""
    ctx = _ctx(llama_world, batch, "full")
    res = evaluate_keep_masks(ctx, torch.zeros(1, len(ctx.occ), dtype=torch.bool))
    total = res["m_clean"] - res["m_null"]
    prompt = ctx.occ.prompt
    errs = []
    for steps in (1, 4, 32):
        s = fap_ig_scores(ctx, IgConfig(steps=steps, rule="midpoint"))
        errs.append(float((torch.zeros(ctx.occ.n_prompts).index_add_(0, prompt, s) - total).abs().max()))
    assert errs[2] < errs[1] < errs[0], errs
    assert errs[2] < 0.02 * float(total.abs().max())


def _shrunk(ctx: BatchContext, eps: float) -> BatchContext:
    """The same batch with the corrupted activations moved to a_clean - eps * Δa (a shorter path)."""
    occ = ctx.occ
    small = dataclasses.replace(occ, a_corr=occ.a_clean - eps * (occ.a_clean - occ.a_corr))
    new = object.__new__(BatchContext)
    new.__dict__.update(ctx.__dict__)
    new.occ = small
    new._scores = {}
    ev = ctx.evaluator
    new.evaluator = PatchEvaluator(
        ctx.model,
        ctx.clt,
        ctx.batch,
        small,
        ctx.rows,
        ctx.cfg.corruption,
        ctx.cfg.metric,
        ev.clean_logits,
        chunk=ev.chunk,
    )
    return new


def test_fap_ig_tends_to_exact_patching_effects_as_the_path_gets_linear(llama_world, batch, one_torch_thread):
    """Shrinking the path makes the model linear along it: FAP-IG (true gradient) -> M({c}) exactly."""
    ctx = _ctx(llama_world, batch, "full")
    rel = []
    for eps in (1.0, 0.1, 0.01):
        c = _shrunk(ctx, eps)
        exact = factp_scores(c.evaluator)  # M({c}) = m_clean - m(c removed), real forwards
        ig = fap_ig_scores(c, IgConfig(steps=8, rule="midpoint"))
        rel.append(float((ig - exact).abs().max() / exact.abs().max()))
    assert rel[1] < 0.3 * rel[0] and rel[2] < 0.3 * rel[1], rel
    assert rel[2] < 0.01, rel


# ----------------------------------------------------------------------------- FAP-iterative
def test_survivor_schedule():
    plan = survivors(torch.tensor([100, 10, 5]), torch.tensor([10, 10, 10]), 3)
    assert plan[:, 0].tolist() == [47, 22, 10]  # 10 * 10^(2/3), 10 * 10^(1/3), 10
    assert plan[:, 1].tolist() == [10, 10, 10] and plan[:, 2].tolist() == [5, 5, 5]


def test_fap_iterative_one_round_is_fap_and_more_rounds_rescore_at_the_pruned_point(
    llama_world, batch, one_torch_thread
):
    ctx = _ctx(llama_world, batch)
    k = 7
    keep1, s1 = iterative_select(ctx, k, IterativeConfig(rounds=1))
    assert torch.equal(keep1, topk_global(ctx.occ, fap(ctx), k))
    keep3, _ = iterative_select(ctx, k, IterativeConfig(rounds=3))
    counts = torch.bincount(ctx.occ.prompt[keep3], minlength=ctx.occ.n_prompts)
    assert counts.tolist() == torch.clamp(ctx.occ.counts(), max=k).tolist()
    # two rounds by hand: FAP at the clean run cuts to the schedule, then FAP at the state where
    # the cut occurrences are removed picks the final K among the survivors
    keep2, s2 = iterative_select(ctx, k, IterativeConfig(rounds=2))
    plan = survivors(ctx.occ.counts(), torch.full((ctx.occ.n_prompts,), k), 2)
    first = topk_global(ctx.occ, fap(ctx), plan[0])
    removed = (~first).nonzero().squeeze(-1)
    off = ctx.evaluator.offsets(ctx.occ.prompt[removed], removed, None, ctx.occ.n_prompts)
    g, _ = patched_mlp_out_gradients(ctx.model, batch.clean_ids, off, batch.correct, batch.wrong)
    here = fap_scores(ctx.occ, g, ctx.rows)
    torch.testing.assert_close(s2[first], here[first])
    _, rank = rank_within(ctx.occ.prompt, torch.where(first, here.abs(), torch.tensor(float("-inf"))))
    assert torch.equal(keep2, first & (rank < k))
    # re-attribution changes circuits (the tiny random world is nearly linear: it does at K=3, R=3)
    assert not torch.equal(iterative_select(ctx, 3, IterativeConfig(rounds=3))[0], topk_global(ctx.occ, fap(ctx), 3))
    with pytest.raises(BudgetError):
        iterative_select(ctx, k, IterativeConfig(rounds=0))


# ----------------------------------------------------------------------------- greedy-refine
def test_greedy_refine_takes_the_exact_best_swap(llama_world, batch, one_torch_thread):
    ctx = _ctx(llama_world, batch)
    k = 6
    s0 = fap(ctx)
    keep0 = topk_global(ctx.occ, s0, k)
    cfg = RefineConfig(n_in=3, n_out=4, max_forwards=1 + 12, rank_by="start")  # room for exactly one round
    keep, tr = refine_circuits(ctx, keep0, s0, cfg)
    assert tr.rounds == 1 and (tr.n_forwards <= cfg.max_forwards).all()
    start = evaluate_keep_masks(ctx, keep0[None])["kl"][0]
    # brute force: every swap of the 3 weakest kept with the 4 strongest left out, one circuit at a time
    prompt = ctx.occ.prompt
    for b in range(ctx.occ.n_prompts):
        idx = (prompt == b).nonzero().squeeze(-1)
        kept = idx[keep0[idx]]
        out = idx[~keep0[idx]]
        weak = kept[torch.argsort(s0[kept].abs(), stable=True)][:3]
        strong = out[torch.argsort(-s0[out].abs(), stable=True)][:4]
        best, best_kl = None, float(start[b])
        for i in weak.tolist():
            for o in strong.tolist():
                m = keep0.clone()
                m[i], m[o] = False, True
                kl = float(evaluate_keep_masks(ctx, m[None])["kl"][0, b])
                if kl < best_kl - cfg.min_gain:
                    best, best_kl = (i, o), kl
        if best is None:
            assert torch.equal(keep[idx], keep0[idx])
        else:
            assert not keep[best[0]] and keep[best[1]]
            assert int((keep[idx] != keep0[idx]).sum()) == 2
            assert abs(float(tr.kl_end[b]) - best_kl) < 1e-4
    assert (tr.kl_end <= tr.kl_start + 1e-6).all()


def test_greedy_refine_never_worsens_keeps_k_and_respects_the_forward_bound(llama_world, batch, one_torch_thread):
    ctx = _ctx(llama_world, batch)
    params = MethodParams(extra={"refine_max_forwards": 60, "refine_n_in": 3, "refine_n_out": 3})
    keep0, _ = METHODS["fap-synergy"].select(ctx, 8, 0, params)
    keep, _ = METHODS["greedy-refine"].select(ctx, 8, 0, params)
    tr = ctx.refine_traces[-1]
    ev = evaluate_keep_masks(ctx, torch.stack([keep0, keep]))
    assert (ev["kl"][1] <= ev["kl"][0] + 1e-5).all()
    torch.testing.assert_close(ev["kl"][1], tr.kl_end, rtol=1e-3, atol=1e-5)
    assert torch.equal(ev["n_kept"][0], ev["n_kept"][1])
    assert (tr.n_forwards <= 60).all() and tr.n_swaps.sum() > 0


def test_bad_parameters_are_one_line_errors(llama_world, batch):
    ctx = _ctx(llama_world, batch)
    for extra in (
        {"ig_steps": 0},
        {"ig_stepz": 4},
        {"ig_rule": "left"},
        {"iter_rounds": 0},
        {"refine_start": "nope"},
        {"refine_start": "greedy-refine"},
        {"refine_n_in": 0},
        {"refine_max_forwards": "many"},
    ):
        name = next(
            n
            for n, p in (("fap-ig", "ig_"), ("fap-iterative", "iter_"), ("greedy-refine", "refine_"))
            if next(iter(extra)).startswith(p)
        )
        with pytest.raises((BudgetError, SettingError)) as info:
            METHODS[name].select(ctx, 5, 0, MethodParams(extra=extra))
        assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------- sweep: registered, reproducible
def test_registered_and_selections_reproduce_with_the_same_seeds(llama_world, tmp_path, one_torch_thread):
    names = ["fap-ig", "fap-iterative", "greedy-refine"]
    assert [m.name for m in get_methods(",".join(names))] == names

    def run(out):
        cfg = PruneConfig(
            model=str(llama_world.model_dir),
            clt=str(llama_world.clt_dir),
            data=str(llama_world.pairs_path),
            methods=names,
            k=[4, 9],
            seeds=[0, 1],
            out=str(out),
            batch_size=4,
            progress=False,
            params=MethodParams(extra={"ig_steps": 4, "refine_max_forwards": 80}),
        )
        df = run_prune(cfg)
        sels = sorted(load_selections(out), key=lambda r: (r["method"], r["k"], r["seed"], r["prompt_idx"]))
        return df, sels

    df1, s1 = run(tmp_path / "a")
    df2, s2 = run(tmp_path / "b")
    assert set(df1["method"]) == set(names) and len(s1) == len(s2) > 0
    assert json.dumps(s1) == json.dumps(s2)
    cols = ["method", "k", "seed", "prompt_idx", "kl", "n_kept"]
    assert (
        df1.sort_values(cols[:4])[cols]
        .reset_index(drop=True)
        .equals(df2.sort_values(cols[:4])[cols].reset_index(drop=True))
    )
    # greedy-refine circuits are never worse than FAP-Synergy's on the same prompts
    assert (df1[df1.method == "greedy-refine"]["n_kept"].to_numpy() <= 9).all()


# ----------------------------------------------------------------------------- remote (NDIF) safety
@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt2"])
def test_patched_gradients_through_a_server_without_pie_lib(tiny_worlds, arch, one_torch_thread):
    """The engine block of the new gradients follows the remote rules: through the subprocess
    'server' of tests/test_remote_requests.py (it cannot import pie_lib) it equals a local run."""
    from nnsight.intervention.backends.remote import RemoteBackend
    from test_remote_requests import Worker, _ids, _remote

    worker = Worker()

    def request(self, request, tracer):
        return self.finalize(worker.call(request.model_key, request.compress, self._serialize(tracer)))

    w = tiny_worlds[arch]
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(RemoteBackend, "request", request)
            rem, loc = _remote(w), w.model
            ids = _ids(w)
            c, wr = torch.tensor([5, 6, 7]), torch.tensor([8, 9, 10])
            base, _ = mlp_out_gradients(loc, ids, c, wr)
            off = torch.randn_like(base) * 0.05
            clean = torch.randn(ids.shape[0], loc.vocab_size)
            for mode in ("replacement", "full"):
                for metric in ("logit_diff", "kl"):
                    g1, m1 = patched_mlp_out_gradients(rem, ids, off, c, wr, metric, mode, clean_logits=clean)
                    g2, m2 = patched_mlp_out_gradients(loc, ids, off, c, wr, metric, mode, clean_logits=clean)
                    assert g1.abs().sum() > 0
                    torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-7)
                    torch.testing.assert_close(m1, m2, rtol=1e-5, atol=1e-6)
            assert worker.requests == 4
    finally:
        worker.close()


def test_cli_runs_the_three_methods_with_ig_steps(llama_world, tmp_path, one_torch_thread):
    from pie_lib.cli import main

    out = tmp_path / "cli"
    argv = [
        "prune",
        "--model",
        str(llama_world.model_dir),
        "--clt",
        str(llama_world.clt_dir),
        "--data",
        str(llama_world.pairs_path),
        "--methods",
        "fap-ig,fap-iterative,greedy-refine",
        "--k",
        "5",
        "--seeds",
        "0",
        "--ig-steps",
        "3",
        "--param",
        "refine_max_forwards=40",
        "--out",
        str(out),
        "--no-progress",
    ]
    assert main(argv) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["identity"]["params"]["extra"] == {"refine_max_forwards": "40", "ig_steps": 3}
    assert {r["method"] for r in load_selections(out)} == {"fap-ig", "fap-iterative", "greedy-refine"}
    bad = [*argv[:-3], "--out", str(tmp_path / "bad"), "--no-progress"]
    bad[bad.index("--ig-steps") + 1] = "0"  # (a flag given twice is itself refused)
    assert main(bad) != 0


def test_cost_benchmark_counts_forwards(tmp_path, one_torch_thread):
    """benchmarks/beyond_costs.py on the toy world: FAP spends one gradient pass per prompt,
    FAP-IG one per path point, greedy-refine stays under its forward bound (plus FAP-Synergy's)."""
    import sys
    from pathlib import Path

    from pie_lib.experiments.runs import toy_world_missing

    if note := toy_world_missing("toy", "toy"):
        pytest.skip(note)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import beyond_costs

    out = tmp_path / "c.json"
    rows = beyond_costs.main(
        [
            "--n",
            "3",
            "--k",
            "4",
            "--methods",
            "fap,fap-synergy,fap-ig,greedy-refine",
            "--param",
            "ig_steps=5",
            "--param",
            "refine_max_forwards=30",
            "--json",
            str(out),
        ]
    )
    by = {r["method"]: r for r in rows}
    assert by["(context)"]["forwards_per_prompt"] == 2  # clean + corrupted
    assert by["fap"]["forwards_per_prompt"] == 1 and by["fap-ig"]["forwards_per_prompt"] == 5
    assert by["greedy-refine"]["forwards_per_prompt"] <= by["fap-synergy"]["forwards_per_prompt"] + 30
    assert json.loads(out.read_text())[0]["method"] == "(context)"
