"""What the notebooks run: the experiments of the paper, on top of every stage.

- :mod:`pie_lib.experiments.runs` -- run folders and the sweeps the notebooks run.
- :mod:`pie_lib.experiments.budget` -- the Effective-Budget tables and figure of one K_ref vs K_cmp.
- :mod:`pie_lib.experiments.runtime` -- per-method selection time on equal footing.
- :mod:`pie_lib.experiments.world` -- the model/CLT card, task accuracy, CLT FVU and L0.
- :mod:`pie_lib.experiments.notebook` -- ``setup()``: seeds, one-line PieErrors, graceful skips.
- :mod:`pie_lib.experiments.paper` -- ``python -m pie_lib.experiments.paper`` runs every notebook.

Submodules are imported on demand (``from pie_lib.experiments import runs``).
"""
