"""``pie prune``: score, select and evaluate K-budget circuits (stage I)."""

from __future__ import annotations

import argparse
import os
import sys

from pie_lib.cli.args import floats, ints, names


def add_prune_parser(sub: argparse._SubParsersAction) -> None:
    from pie_lib.prune.defaults import DEFAULT_LADDER, DEFAULT_METHODS  # a leaf module: --help stays fast

    p = sub.add_parser(
        "prune",
        help="score, select and evaluate K-budget circuits (Stage I)",
        description="Prune: FAP, FAP-Synergy and baselines over a K ladder and seeds. "
        "Defaults to the embedded toy world.",
    )
    p.add_argument("--model", default="toy", help="HF folder or hub id; 'toy' or 'toy:gpt2' for the toy world")
    p.add_argument("--clt", default="toy", help="CLT folder or hub id (circuit-tracer format); 'toy' for the toy world")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--data", help="JSONL of pairs (text_clean, text_corr, io_clean, s_clean)")
    src.add_argument(
        "--task",
        choices=["ioi", "docstring"],
        default=None,
        help="generate pairs of this task (default ioi when --data is not given)",
    )
    p.add_argument(
        "--n",
        type=int,
        default=None,
        help="number of pairs: the first N of --data (default: every pair of the file), or N generated pairs of "
        "--task (default 32)",
    )
    p.add_argument(
        "--data-seed",
        type=int,
        default=None,
        help="seed of generated pairs (default 0); -1 = each sweep seed draws its own prompts; not with --data",
    )
    p.add_argument("--methods", type=names, default=list(DEFAULT_METHODS), help="comma list; see `pie methods`")
    p.add_argument("--k", type=ints, default=list(DEFAULT_LADDER), help="budgets K (occurrences per prompt)")
    p.add_argument("--k-frac", type=floats, default=[], help="budgets as fractions of each prompt's active set")
    p.add_argument("--seeds", type=ints, default=[0, 1, 2])
    p.add_argument("--out", default="runs/prune", help="output folder (results.parquet, selections.jsonl)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="float32 / bfloat16 (default: float32 on CPU, bfloat16 on GPU)")
    p.add_argument("--remote", action="store_true", help="run every trace on NDIF (nnsight remote execution)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--min-tokens", type=int, default=0, help="skip prompts shorter than this (reference: 8)")
    p.add_argument(
        "--target-token",
        choices=["single", "last"],
        default="single",
        help="single: a target must be one token (default); last: score a multi-token target by its last token "
        "(the reference's behaviour; the pairs affected are printed and counted in config.json)",
    )
    p.add_argument(
        "--cut-corrupted",
        action="store_true",
        help="cut corrupted prompts longer than their clean prompt to the clean length (the reference's behaviour; "
        "default: a length mismatch is an error); the pairs cut are printed and counted in config.json",
    )
    p.add_argument("--gradient", choices=["replacement", "full"], default="replacement")
    p.add_argument("--corruption", choices=["corrupted", "zero"], default="corrupted")
    p.add_argument("--metric", choices=["logit_diff", "logsumexp"], default="logit_diff")
    p.add_argument(
        "--chunk",
        type=int,
        default=None,
        help="patch variants per forward (default: sized from free memory and prompt length)",
    )
    p.add_argument("--lambda-syn", type=float, default=3.0, help="FAP-Synergy λ (paper 3.0; reference script 5.0)")
    p.add_argument("--boundary-percent", type=float, default=25.0, help="FAP-Synergy bp (paper 25; script 50)")
    p.add_argument("--boundary-cap", type=int, default=32)
    p.add_argument("--partners", type=int, default=32, help="partners per refresh")
    p.add_argument("--partners-per-candidate", type=int, default=8)
    p.add_argument(
        "--synergy-precision",
        choices=["float32", "model"],
        default="float32",
        help="dtype of FAP-Synergy's M(.) forwards: float32 whatever the model's dtype (default), or the model's",
    )
    p.add_argument(
        "--synergy-eff-tol",
        type=float,
        default=0.0,
        help="FAP-Synergy uses Syn(c, p) only where both single effects exceed this (paper: > 0)",
    )
    p.add_argument("--gamma", type=float, default=0.2, help="FAP-Signal γ in (0, 0.5)")
    p.add_argument("--acdc-tau", type=float, default=None, help="ACDC threshold on KL increase")
    p.add_argument(
        "--ig-steps",
        type=int,
        default=None,
        help="FAP-IG: points on the corrupted -> clean path (default 16; 1 = plain FAP); = --param ig_steps=N",
    )
    p.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="hyper-parameter of a related method, repeatable (e.g. ep_steps=100, hap_mult=4, "
        "ens_members=fap,clt-relp, iter_rounds=4, refine_max_forwards=512); see pie_lib/prune/related/config.py "
        "and pie_lib/prune/beyond/config.py",
    )
    p.add_argument(
        "--shard",
        default=None,
        metavar="I/N",
        help="compute part I of N (0-based; e.g. $SLURM_ARRAY_TASK_ID/8) into OUT/shards/; combine with `pie merge`",
    )
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_run_prune)


def prune_config_from_args(a: argparse.Namespace):
    """Build a :class:`PruneConfig` from parsed ``pie prune`` arguments."""
    from pie_lib.prune.context import ScoringConfig
    from pie_lib.prune.params import MethodParams
    from pie_lib.prune.select import SynergyConfig
    from pie_lib.prune.sweep import PruneConfig

    return PruneConfig(
        model=a.model,
        clt=a.clt,
        data=a.data,
        task=a.task or "ioi",
        n=a.n,
        data_seed=_data_seed(a),
        methods=a.methods,
        k=a.k,
        k_frac=a.k_frac,
        seeds=a.seeds,
        out=a.out,
        device=a.device,
        dtype=a.dtype,
        remote=a.remote,
        batch_size=a.batch_size,
        min_tokens=a.min_tokens,
        target_token=a.target_token,
        cut_corrupted=a.cut_corrupted,
        scoring=ScoringConfig(gradient=a.gradient, corruption=a.corruption, metric=a.metric, chunk=a.chunk),
        params=MethodParams(
            synergy=SynergyConfig(
                lam=a.lambda_syn,
                boundary_percent=a.boundary_percent,
                boundary_cap=a.boundary_cap,
                partners=a.partners,
                partners_per_candidate=a.partners_per_candidate,
                precision=a.synergy_precision,
                eff_tol=a.synergy_eff_tol,
            ),
            signal_gamma=a.gamma,
            acdc_tau=a.acdc_tau,
            extra=_extra(a),
        ),
        progress=not a.no_progress,
        shard=a.shard,
    )


def _data_seed(a: argparse.Namespace) -> int | None:
    """--data-seed: 0 when not given, None for -1; refused with --data (its pairs are fixed)."""
    if a.data_seed is not None and a.data is not None:
        from pie_lib.errors import SettingError

        raise SettingError("--data-seed seeds generated pairs (--task); a --data file's pairs are fixed -- drop it")
    return 0 if a.data_seed is None else (None if a.data_seed == -1 else a.data_seed)


def quiet_progress() -> None:
    """No progress bars from transformers / huggingface_hub either (``--no-progress``)."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def _extra(a: argparse.Namespace) -> dict[str, object]:
    """``--param`` pairs plus ``--ig-steps`` (set only when given, so old folders keep their identity)."""
    from pie_lib.errors import SettingError

    extra: dict[str, object] = dict(_key_values(a.param))
    steps = getattr(a, "ig_steps", None)
    if steps is not None:
        if steps < 1:
            raise SettingError(f"--ig-steps {steps}: the number of path points must be a positive integer (default 16)")
        if "ig_steps" in extra and str(extra["ig_steps"]) != str(steps):
            raise SettingError(
                f"--ig-steps {steps} and --param ig_steps={extra['ig_steps']} disagree; give one of them"
            )
        extra["ig_steps"] = steps
    return extra


def _key_values(items: list[str]) -> dict[str, str]:
    """``["ep_steps=100", ...]`` -> ``{"ep_steps": "100"}`` (values are parsed by each method's config)."""
    from pie_lib.errors import BudgetError

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise BudgetError(f"--param {item!r} must look like KEY=VALUE (e.g. ep_steps=100)")
        out[key.strip()] = value.strip()
    return out


def _run_prune(a: argparse.Namespace) -> int:
    from pie_lib.engine.remote import request_count
    from pie_lib.prune.shard import parse_shard, shard_folder
    from pie_lib.prune.sweep import run_prune

    cfg = prune_config_from_args(a)
    before = request_count()
    df = run_prune(cfg)
    summary = df.groupby(["method", "budget", "k"], sort=True)["kl"].agg(["mean", "std", "count"])
    print(summary.to_string())
    shard = parse_shard(cfg.shard)
    folder = shard_folder(cfg.out, shard) if shard else cfg.out
    print(f"wrote {folder}/results.parquet and {folder}/selections.jsonl ({len(df)} rows)")
    if shard:
        print(f"shard {shard} done; when every shard is: pie merge --out {cfg.out}")
    if cfg.remote:
        print(f"remote requests: {request_count() - before}")
    return 0
