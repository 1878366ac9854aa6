"""Hyper-parameters of the circuit-discovery methods (paper defaults)."""

from __future__ import annotations

from dataclasses import dataclass, field

from pie_lib.prune.select import SynergyConfig


@dataclass
class MethodParams:
    """Hyper-parameters of the methods (paper defaults). Fields are CLI flags of ``pie prune``."""

    synergy: SynergyConfig = field(default_factory=SynergyConfig)
    signal_gamma: float = 0.2
    acdc_tau: float | None = None
    extra: dict = field(default_factory=dict)  # hyper-parameters of registered related methods
