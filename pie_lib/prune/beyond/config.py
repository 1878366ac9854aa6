"""Hyper-parameters of the methods beyond the paper, read from ``MethodParams.extra``.

Like the related methods' configs, each dataclass owns one key prefix of the flat ``extra`` dict
(CLI: ``--param key=value``; FAP-IG's step count also has its own flag, ``--ig-steps``). A key
with one of these prefixes that names no field is an error listing the valid keys, so a typo
never silently runs the defaults.

===========  =========================  ==================
prefix       config                     used by
===========  =========================  ==================
``ig_``      :class:`IgConfig`          fap-ig
``iter_``    :class:`IterativeConfig`   fap-iterative
``refine_``  :class:`RefineConfig`      greedy-refine
===========  =========================  ==================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeVar

from pie_lib.prune.extra import build_from_extra, register_configs

C = TypeVar("C")


@dataclass
class IgConfig:
    """FAP-IG. Keys ``ig_<field>``.

    Attributes:
        steps: points on the path corrupted -> clean (``--ig-steps``; 1 = plain FAP).
        rule: "right" (points j/S, j = 1..S: one step is the clean end) or "midpoint".
        max_rows: rows (prompts x points) per forward/backward; 0 = all at once (default).
    """

    steps: int = 16
    rule: str = "right"
    max_rows: int = 0


@dataclass
class IterativeConfig:
    """FAP-iterative. Keys ``iter_<field>``.

    Attributes:
        rounds: gradient rounds R. Round r keeps ``ceil(K * (n / K) ** ((R - r) / R))`` of a
            prompt's n active occurrences (a geometric schedule: every round removes the same
            share of what is left); the last round cuts to exactly K. R = 1 is plain FAP.
    """

    rounds: int = 4


@dataclass
class RefineConfig:
    """greedy-refine. Keys ``refine_<field>``.

    Attributes:
        start: registry name of the method whose top-K is refined (default FAP-Synergy).
        n_in, n_out: each round tries every swap of one of the ``n_in`` weakest kept occurrences
            for one of the ``n_out`` strongest left out.
        rank_by: what "weakest" / "strongest" means: "kl-gradient" (default: the first-order
            change of the circuit's KL when an occurrence is removed / added back, from one true
            gradient of the KL at the current circuit per round) or "start" (the start method's
            |score|, fixed).
        max_forwards: bound on the patched forwards (sequences) the refinement spends per prompt,
            its first evaluation of the start circuit included; a round that does not fit is not run.
        min_gain: a swap must lower the prompt's KL by more than this (nats) to be taken.
    """

    start: str = "fap-synergy"
    n_in: int = 6
    n_out: int = 6
    rank_by: str = "kl-gradient"
    max_forwards: int = 512
    min_gain: float = 1e-6


PREFIXES: dict[type, str] = {IgConfig: "ig_", IterativeConfig: "iter_", RefineConfig: "refine_"}


def _convert(value: Any, tp: Any, key: str) -> Any:
    if tp is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(key)
        return int(float(value)) if isinstance(value, str) else int(value)
    if tp is float:
        return float(value)
    return str(value)


def config_from_extra(cls: type[C], extra: dict | None) -> C:
    """Build ``cls`` from the keys of ``extra`` that carry its prefix (:func:`pie_lib.prune.extra.build_from_extra`)."""
    return build_from_extra(cls, extra, PREFIXES[cls], _convert)


register_configs(PREFIXES, _convert)

__all__ = ["IgConfig", "IterativeConfig", "PREFIXES", "RefineConfig", "config_from_extra"]
