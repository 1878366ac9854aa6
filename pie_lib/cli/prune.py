"""``pie prune``: score, select and evaluate K-budget circuits (stage I)."""

from __future__ import annotations

import argparse
import os
import sys

from pie_lib.cli.fields import FieldFlags, add_config_flags, config_from_args, config_values, flag

#: ``pie prune``'s flags of each config: field name -> flag (type, choices, default and help come from the
#: field; see pie_lib/prune/config.py). ``--data`` / ``--task`` are added as a mutually exclusive pair.
WORLD_FLAGS: FieldFlags = {"model": "--model", "clt": "--clt"}
SOURCE_FLAGS: FieldFlags = {
    "data": "--data",
    # None = not given: ioi unless --data is (resolved in prune_config_from_args)
    "task": flag("--task", default=None, help="generate pairs of this task (default ioi when --data is not given)"),
}
RUN_FLAGS: FieldFlags = {
    "n": "--n",
    # None = not given: 0, and refused with --data; -1 = None (each seed its own prompts)
    "data_seed": flag("--data-seed", default=None),
    "methods": "--methods",
    "k": "--k",
    "k_frac": "--k-frac",
    "seeds": "--seeds",
    "out": "--out",
    "device": "--device",
    "dtype": "--dtype",
    "remote": "--remote",
    "model_backend": "--model-backend",
    "batch_size": "--batch-size",
    "min_tokens": "--min-tokens",
    "target_token": "--target-token",
    "cut_corrupted": "--cut-corrupted",
}
SCORING_FLAGS: FieldFlags = {
    "gradient": "--gradient",
    "corruption": "--corruption",
    "metric": "--metric",
    "chunk": "--chunk",
}
SYNERGY_FLAGS: FieldFlags = {
    "lam": "--lambda-syn",
    "boundary_percent": "--boundary-percent",
    "boundary_cap": "--boundary-cap",
    "partners": "--partners",
    "partners_per_candidate": "--partners-per-candidate",
    "precision": "--synergy-precision",
    "eff_tol": "--synergy-eff-tol",
}
METHOD_FLAGS: FieldFlags = {"signal_gamma": "--gamma", "acdc_tau": "--acdc-tau"}
SHARD_FLAGS: FieldFlags = {"shard": flag("--shard", metavar="I/N")}


def add_prune_parser(sub: argparse._SubParsersAction) -> None:
    # pie_lib.prune.config imports no torch / pandas: --help stays fast (tests/test_startup.py)
    from pie_lib.prune.config import MethodParams, PruneConfig, ScoringConfig, SynergyConfig

    p = sub.add_parser(
        "prune",
        help="score, select and evaluate K-budget circuits (Stage I)",
        description="Prune: FAP, FAP-Synergy and baselines over a K ladder and seeds. "
        "Defaults to the embedded toy world.",
    )
    add_config_flags(p, PruneConfig, WORLD_FLAGS)
    add_config_flags(p.add_mutually_exclusive_group(), PruneConfig, SOURCE_FLAGS)
    add_config_flags(p, PruneConfig, RUN_FLAGS)
    add_config_flags(p, ScoringConfig, SCORING_FLAGS)
    add_config_flags(p, SynergyConfig, SYNERGY_FLAGS)
    add_config_flags(p, MethodParams, METHOD_FLAGS)
    # --ig-steps and --param are keys of MethodParams.extra, read by each plugin's own config
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
    add_config_flags(p, PruneConfig, SHARD_FLAGS)
    p.add_argument("--no-progress", action="store_true", help="no progress bars (PruneConfig.progress=False)")
    p.set_defaults(func=_run_prune)


def prune_config_from_args(a: argparse.Namespace):
    """Build a :class:`PruneConfig` from parsed ``pie prune`` arguments."""
    from pie_lib.prune.config import MethodParams, PruneConfig, ScoringConfig, SynergyConfig

    run = config_values(a, RUN_FLAGS)
    run["data_seed"] = _data_seed(a)
    return PruneConfig(
        **config_values(a, WORLD_FLAGS),
        **config_values(a, SOURCE_FLAGS) | {"task": a.task or "ioi"},
        **run,
        scoring=config_from_args(ScoringConfig, a, SCORING_FLAGS),
        params=config_from_args(
            MethodParams, a, METHOD_FLAGS, synergy=config_from_args(SynergyConfig, a, SYNERGY_FLAGS), extra=_extra(a)
        ),
        progress=not a.no_progress,
        **config_values(a, SHARD_FLAGS),
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
    from pie_lib.prune.sweep import run_prune_rows

    cfg = prune_config_from_args(a)
    before = request_count()
    rows = run_prune_rows(cfg)  # plain rows: the run and its summary import no pandas (~0.3 s)
    print(kl_summary(rows))
    shard = parse_shard(cfg.shard)
    folder = shard_folder(cfg.out, shard) if shard else cfg.out
    print(f"wrote {folder}/results.parquet and {folder}/selections.jsonl ({len(rows)} rows)")
    if shard:
        print(f"shard {shard} done; when every shard is: pie merge --out {cfg.out}")
    if cfg.remote:
        print(f"remote requests: {request_count() - before}")
    return 0


def kl_summary(rows: list[dict]) -> str:
    """Mean, standard deviation (n - 1) and count of the KL per (method, budget, k), sorted by them;
    NaN KLs (prompts with no active occurrence) are left out, as pandas' ``agg`` leaves them out."""
    import math
    import statistics

    groups: dict[tuple, list[float]] = {}
    for r in rows:
        vals = groups.setdefault((r["method"], r["budget"], r["k"]), [])
        if r["kl"] is not None and not math.isnan(r["kl"]):
            vals.append(float(r["kl"]))
    head = ("method", "budget", "k", "mean", "std", "count")
    table = [head] + [
        (
            m,
            b,
            f"{k:g}",
            f"{statistics.fmean(v):.6g}" if v else "NaN",
            f"{statistics.stdev(v):.6g}" if len(v) > 1 else "NaN",
            str(len(v)),
        )
        for (m, b, k), v in sorted(groups.items())
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    return "\n".join(
        "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in table
    )
