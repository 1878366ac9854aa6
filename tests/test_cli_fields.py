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
