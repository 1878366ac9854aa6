"""Hyper-parameters of the related methods, read from ``MethodParams.extra``.

``MethodParams.extra`` is a flat dict (CLI: ``--param key=value``, repeatable). Each config below owns one key
prefix; a key ``<prefix><field>`` sets that field. Values may be typed or strings (from a command
line): strings are converted to the field's type. An unknown key with a known prefix is an error
naming the valid keys, so a typo never silently runs the defaults.

===================  ==========================  ==============================================
prefix               config                      used by
===================  ==========================  ==============================================
``ep_``              :class:`MaskConfig`         edge-pruning, edge-pruning-shared, hap,
                                                 ensemble-seq
``hap_``             :class:`HapConfig`          hap
``ens_``             :class:`EnsembleConfig`     ensemble-mean / -min / -max, ensemble-seq
===================  ==========================  ==============================================
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Any, TypeVar

from pie_lib.errors import BudgetError
from pie_lib.prune.extra import build_from_extra, register_configs

C = TypeVar("C")


@dataclass
class MaskConfig:
    """Edge-Pruning-style mask learning over occurrences (spec §10). Keys ``ep_<field>``.

    Attributes:
        steps: optimisation steps (each one real forward + backward of the batch).
        lr: Adam learning rate of the mask logits ``log_alpha``.
        warmup: steps over which the target density ramps linearly from 1 to ``K / n``.
        lambda_lr: learning rate of the Lagrange multipliers λ1, λ2 (gradient *ascent*).
        init_mean, init_std: ``log_alpha ~ N(init_mean, init_std)`` (Edge Pruning: N(10, 0.01)).
        beta: hard-concrete temperature (2/3); stretch: hard-concrete interval (γ, ζ) = (-0.1, 1.1).
        share: sharing unit of ``edge-pruning-shared``: "layer-pos-feature" (default: one mask per
            (layer, position counted from the end, feature), shared by the prompts of a batch; the
            task-relevant tail of IOI / Doc-String prompts aligns from the end) or "layer-feature"
            (one mask per (layer, feature), shared across prompts *and* positions).
        seq_lo, seq_hi: ensemble-seq warm start, ``log_alpha = lo + (hi - lo) · r`` with r the
            normalised FAP rank in [0, 1] (1 = best).
    """

    steps: int = 150
    lr: float = 0.2
    warmup: int = 100
    lambda_lr: float = 0.3
    init_mean: float = 10.0
    init_std: float = 0.01
    beta: float = 2.0 / 3.0
    gamma: float = -0.1
    zeta: float = 1.1
    share: str = "layer-pos-feature"
    seq_lo: float = 2.0
    seq_hi: float = 10.0


@dataclass
class HapConfig:
    """HAP prescreen (spec §10). Keys ``hap_<field>``.

    Attributes:
        mult: the pool keeps ``M = min(n_active, max(ceil(mult · K), min_pool))`` occurrences per
            prompt by |FAP|; mask learning runs over the pool only, the rest stay removed (z = 0).
        min_pool: lower bound on M for small K.
        steps, warmup: mask-learning steps and warm-up for HAP (None = ``ep_steps`` /
            ``ep_warmup``). The pool is small, so fewer steps suffice: that is where HAP's speed-up
            comes from here (the cost of a step is the model forward/backward, pool or not).
    """

    mult: float = 4.0
    min_pool: int = 32
    steps: int | None = None
    warmup: int | None = None


@dataclass
class EnsembleConfig:
    """MIB ensembles (spec §10). Keys ``ens_<field>``.

    Attributes:
        members: registry names combined by the parallel ensembles (comma string or list).
    """

    members: tuple[str, ...] = ("fap", "clt-relp", "act-mag")


PREFIXES: dict[type, str] = {MaskConfig: "ep_", HapConfig: "hap_", EnsembleConfig: "ens_"}


def _convert(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if type(None) in typing.get_args(tp):  # Optional[X]
        if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
            return None
        return _convert(value, args[0], key)
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        return tuple(str(v) for v in value)
    if tp in (int, "int"):
        if isinstance(value, float) and not value.is_integer():
            raise BudgetError(f"{key}={value!r} must be an integer")
        return int(float(value)) if isinstance(value, str) else int(value)
    if tp in (float, "float"):
        return float(value)
    return value


def config_from_extra(cls: type[C], extra: dict | None) -> C:
    """Build ``cls`` from the keys of ``extra`` that carry its prefix (:func:`pie_lib.prune.extra.build_from_extra`)."""
    return build_from_extra(cls, extra, PREFIXES[cls], _convert)


register_configs(PREFIXES, _convert)

__all__ = ["EnsembleConfig", "HapConfig", "MaskConfig", "config_from_extra", "PREFIXES"]
