"""Hyper-parameters of the circuit-discovery methods (paper defaults); defined in :mod:`pie_lib.prune.config`."""

from __future__ import annotations

from pie_lib.prune.config import MethodParams, SynergyConfig

__all__ = ["MethodParams", "SynergyConfig"]
