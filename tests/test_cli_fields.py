"""CLI flags derived from a config dataclass (pie_lib.cli.fields)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from pie_lib.cli.fields import add_config_flags, attribute_docs, config_from_args
from pie_lib.cli.interpret import CORPUS_FLAGS
from pie_lib.interpret.corpus import CorpusConfig


@dataclass
class _Cfg:
    """A config.

    Attributes:
        a, b: two numbers
            on two lines.
        name: a name.
    """

    a: int = 1
    b: float | None = None
    name: str = "x"


def test_flags_types_defaults_and_help_come_from_the_dataclass():
    assert attribute_docs(_Cfg) == {
        "a": "two numbers on two lines.",
        "b": "two numbers on two lines.",
        "name": "a name.",
    }
    p = argparse.ArgumentParser()
    fields = {"a": "--a", "b": "--bee", "name": "--name"}
    add_config_flags(p, _Cfg, fields)
    assert config_from_args(_Cfg, p.parse_args([]), fields) == _Cfg()
    got = config_from_args(_Cfg, p.parse_args(["--a", "3", "--bee", "0.5", "--name", "y"]), fields)
    assert got == _Cfg(3, 0.5, "y") and isinstance(got.a, int)
    assert "two numbers on two lines (default 1)" in p.format_help()


def test_pie_interpret_corpus_flags_build_its_corpus_config():
    from pie_lib.cli import build_parser

    args = build_parser().parse_args(["interpret", "--features", "0:1", "--corpus", "docs.txt", "--n-docs", "7"])
    cfg = config_from_args(CorpusConfig, args, CORPUS_FLAGS)
    assert cfg == CorpusConfig(source="docs.txt", n_docs=7)


def _prune_args(*argv: str):
    from pie_lib.cli import build_parser

    return build_parser().parse_args(["prune", *argv])


def test_pie_prune_flags_build_the_same_config_as_the_dataclass_defaults():
    from pie_lib.cli import prune_config_from_args
    from pie_lib.prune.config import PruneConfig

    assert prune_config_from_args(_prune_args()) == PruneConfig()


def test_pie_prune_flags_reach_their_fields():
    from pie_lib.cli import prune_config_from_args

    cfg = prune_config_from_args(
        _prune_args(
            *("--task", "docstring", "--n", "5", "--data-seed", "-1", "--methods", "fap,random", "--k", "3,4"),
            *("--k-frac", "0.5", "--seeds", "7", "--batch-size", "2", "--min-tokens", "1", "--target-token", "last"),
            *("--cut-corrupted", "--remote", "--gradient", "full", "--corruption", "zero", "--metric", "logsumexp"),
            *("--chunk", "9", "--lambda-syn", "5", "--boundary-percent", "50", "--boundary-cap", "4"),
            *("--partners", "6", "--partners-per-candidate", "2", "--synergy-precision", "model"),
            *("--synergy-eff-tol", "0.1", "--gamma", "0.3", "--acdc-tau", "0.01", "--shard", "1/2", "--no-progress"),
        )
    )
    assert (cfg.task, cfg.n, cfg.data_seed, cfg.methods, cfg.k, cfg.k_frac, cfg.seeds) == (
        "docstring",
        5,
        None,
        ["fap", "random"],
        [3, 4],
        [0.5],
        [7],
    )
    assert (cfg.batch_size, cfg.min_tokens, cfg.target_token, cfg.cut_corrupted, cfg.remote) == (
        2,
        1,
        "last",
        True,
        True,
    )
    assert (cfg.scoring.gradient, cfg.scoring.corruption, cfg.scoring.metric, cfg.scoring.chunk) == (
        "full",
        "zero",
        "logsumexp",
        9,
    )
    syn = cfg.params.synergy
    assert (syn.lam, syn.boundary_percent, syn.boundary_cap, syn.partners, syn.partners_per_candidate) == (
        5.0,
        50.0,
        4,
        6,
        2,
    )
    assert (syn.precision, syn.eff_tol, cfg.params.signal_gamma, cfg.params.acdc_tau) == ("model", 0.1, 0.3, 0.01)
    assert (cfg.shard, cfg.progress) == ("1/2", False)


def test_every_derived_prune_flag_is_documented_and_its_choices_match_the_engine():
    import typing

    from pie_lib.cli import prune as cli_prune
    from pie_lib.engine.traces import MetricKind
    from pie_lib.prune import config
    from pie_lib.prune.occurrences import Corruption

    for cls, flags in (
        (config.PruneConfig, {**cli_prune.WORLD_FLAGS, **cli_prune.SOURCE_FLAGS, **cli_prune.RUN_FLAGS}),
        (config.ScoringConfig, cli_prune.SCORING_FLAGS),
        (config.SynergyConfig, cli_prune.SYNERGY_FLAGS),
        (config.MethodParams, cli_prune.METHOD_FLAGS),
    ):
        docs = attribute_docs(cls)
        assert not [name for name in flags if not docs.get(name)], cls
    hints = typing.get_type_hints(config.ScoringConfig, localns={"torch": __import__("torch")})
    assert typing.get_args(hints["corruption"]) == typing.get_args(Corruption)
    assert typing.get_args(hints["metric"]) == typing.get_args(MetricKind)


def test_the_config_module_imports_no_torch():
    import subprocess
    import sys

    code = "import sys, pie_lib.prune.config; print([m for m in ('torch', 'pandas') if m in sys.modules])"
    assert (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"
    )


def test_old_homes_re_export_the_configs():
    from pie_lib.prune import config, context, params, select, sweep

    assert context.ScoringConfig is sweep.ScoringConfig is config.ScoringConfig
    assert select.SynergyConfig is params.SynergyConfig is config.SynergyConfig
    assert params.MethodParams is sweep.MethodParams is config.MethodParams
    assert sweep.PruneConfig is config.PruneConfig
