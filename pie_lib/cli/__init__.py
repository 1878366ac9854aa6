"""The ``pie`` command: one module per command (``prune``, ``interpret``, ``evaluate``, ``methods``,
``toy``); :mod:`pie_lib.cli.app` builds the parser from them and turns errors into one line."""

from __future__ import annotations

from pie_lib.cli.app import build_parser, main, run
from pie_lib.cli.prune import prune_config_from_args

__all__ = ["build_parser", "main", "prune_config_from_args", "run"]
