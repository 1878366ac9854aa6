"""Figures and tables of the paper, drawn from result tables (pure: tables in, tables and figures out).

- :mod:`pie_lib.report.plots` -- figure functions; each saves ``<name>.png`` and ``.pdf``.
- :mod:`pie_lib.report.tables` -- table builders and :func:`~pie_lib.report.tables.write_table`
  (CSV + Markdown + LaTeX).
- :mod:`pie_lib.report.paper_numbers` -- the numbers the paper reports, as data.

What the notebooks *run* (sweeps, timings, the toy-world card) is :mod:`pie_lib.experiments`.
Submodules are imported on demand (``from pie_lib.report import plots``).
"""
