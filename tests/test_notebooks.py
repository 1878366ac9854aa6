"""The paper notebooks: thin papermill sources, and every one runs with tiny parameters.

The smoke run executes every notebook through ``python -m pie_lib.experiments.paper --tiny --out <tmp>``
(few prompts, one seed, two methods, a small ladder), so the repository's ``figures/`` is never
touched, and checks that no cell errored, nothing was skipped, and every figure (PNG + PDF) and
table (CSV + Markdown + LaTeX) was written.
"""

from __future__ import annotations

import ast
import os

import nbformat
import pytest

from pie_lib.experiments import paper
from pie_lib.experiments.runs import toy_world_missing

COMMON = {"model", "clt", "device", "remote", "out", "figures", "tiny"}


def _sources():
    return {name: nbformat.read(paper.NOTEBOOK_DIR / f"{name}.ipynb", as_version=4) for name in paper.NOTEBOOKS}


def _outputs(nb, kind):
    return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == kind]


def test_sources_are_thin_parameterised_and_clean():
    for name, nb in _sources().items():
        first = nb.cells[0]
        assert first.cell_type == "code" and "parameters" in first.metadata.get("tags", []), name
        assert COMMON <= paper.declared_parameters(paper.NOTEBOOK_DIR / f"{name}.ipynb"), name
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.get("outputs") and cell.get("execution_count") is None, f"{name}: outputs stored"
                ast.parse(cell.source)
                if cell is not first:
                    assert len(cell.source.splitlines()) <= 12, f"{name}: a cell longer than glue"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    note = toy_world_missing("toy", "toy")
    if note:
        pytest.skip(note)
    out = tmp_path_factory.mktemp("paper")
    rc = paper.main(["--tiny", "--out", str(out)])
    return out, rc


@pytest.mark.slow
def test_every_notebook_runs_with_tiny_parameters(tiny_run):
    out, rc = tiny_run
    assert rc == 0
    for name in paper.NOTEBOOKS:
        nb = nbformat.read(out / "notebooks" / "executed" / f"{name}.ipynb", as_version=4)
        errors = _outputs(nb, "error")
        assert not errors, f"{name}: {errors[0].ename}: {errors[0].evalue}"
        text = "".join(o.get("text", "") for o in _outputs(nb, "stream"))
        assert "SKIPPED" not in text, f"{name} skipped: {text}"


@pytest.mark.slow
def test_every_figure_and_table_is_written_outside_the_repo(tiny_run):
    out, _ = tiny_run
    figures = out / "figures"
    for name in paper.NOTEBOOKS:
        assert paper.missing_outputs(name, figures) == [], name
    md = (figures / "tables" / "effective_budget.md").read_text()
    assert "TOST" in md and "FAP" in md
    assert (out / "runs" / "paper" / "toy" / "01_prune" / "ioi" / "results.parquet").exists()
    import pandas as pd

    eb = pd.read_csv(figures / "tables" / "beyond_effective_budget.csv")
    assert list(eb.columns) == [
        "task",
        "method",
        "reference",
        "k_ref",
        "k_eff",
        "k_eff_ci_low",
        "k_eff_ci_high",
        "n_prompts",
        "n_seeds",
    ]
    assert set(eb["method"]) == {"fap-ig", "fap-iterative", "greedy-refine"} and set(eb["reference"]) == {
        "fap",
        "fap-synergy",
    }


@pytest.mark.slow
def test_unfetchable_weights_fail_with_one_line(tmp_path, monkeypatch):
    import papermill as pm

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    target = tmp_path / "01.ipynb"
    with pytest.raises(pm.PapermillExecutionError) as info:
        pm.execute_notebook(
            str(paper.NOTEBOOK_DIR / "01_prune.ipynb"),
            str(target),
            cwd=str(paper.REPO),
            parameters={
                "model": str(tmp_path / "no_such_model"),
                "clt": str(tmp_path / "no_such_clt"),
                "out": str(tmp_path / "runs"),
                "figures": str(tmp_path / "fig"),
                "tiny": True,
            },
            progress_bar=False,
        )
    assert info.value.ename == "WeightsUnavailableError"
    (err,) = _outputs(nbformat.read(target, as_version=4), "error")
    assert len(err.traceback) == 1 and err.traceback[0].startswith("WeightsUnavailableError: model ")
    assert not (tmp_path / "fig").exists() and os.path.basename(str(tmp_path)) in str(info.value.evalue)
