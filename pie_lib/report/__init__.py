"""Figures and tables of the paper, drawn from result tables (used by ``notebooks/``).

- :mod:`pie_lib.report.plots` -- figure functions; each saves ``<name>.png`` and ``.pdf``.
- :mod:`pie_lib.report.tables` -- table builders and :func:`~pie_lib.report.tables.write_table`
  (CSV + Markdown + LaTeX).
- :mod:`pie_lib.report.budget` -- the Effective-Budget tables and figure of one K_ref vs K_cmp.
- :mod:`pie_lib.report.paper_numbers` -- the numbers the paper reports, as data.
- :mod:`pie_lib.report.runs` -- run folders and the sweeps the notebooks run.
- :mod:`pie_lib.report.notebook` -- ``setup()``: seeds, one-line PieErrors, graceful skips.
- :mod:`pie_lib.report.world` -- the model/CLT card, task accuracy, CLT FVU and L0.
- :mod:`pie_lib.report.runtime` -- per-method selection time on equal footing.

``python -m pie_lib.paper`` runs every notebook (see :mod:`pie_lib.paper`).
"""

from __future__ import annotations

import importlib
from typing import Any

_SUBMODULES = ("budget", "notebook", "paper_numbers", "plots", "runs", "runtime", "tables", "world")

__all__ = list(_SUBMODULES)


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"pie_lib.report.{name}")
    raise AttributeError(f"module 'pie_lib.report' has no attribute {name!r}")
