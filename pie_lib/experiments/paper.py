"""Regenerate every figure and table of the paper: run the notebooks with papermill.

    python -m pie_lib.experiments.paper                      # all notebooks, toy world, into the repo
    python -m pie_lib.experiments.paper --only 02_effective_budget
    python -m pie_lib.experiments.paper --tiny --out /tmp/x  # CI smoke settings, everything under /tmp/x
    python -m pie_lib.experiments.paper -p model=meta-llama/Llama-3.2-1B -p clt=mntss/clt-llama-3.2-1b-524k -p device=cuda

Executed notebooks go to ``notebooks/executed/``, figures (PNG + PDF) to ``figures/``, tables
(CSV + Markdown + LaTeX) to ``figures/tables/`` and the sweeps to ``runs/paper/`` (resumable: a
rerun reuses finished rows; ``--fresh`` deletes them first). ``--out DIR`` puts all four under
``DIR`` instead. The time of each notebook and the total are printed at the end.
"""

from __future__ import annotations

import argparse
import ast
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]  # pie_lib/experiments/paper.py -> the repository
NOTEBOOK_DIR = REPO / "notebooks"
NOTEBOOKS: tuple[str, ...] = (
    "00_toy_world",
    "01_prune",
    "02_effective_budget",
    "03_interpret",
    "04_evaluate",
    "05_related_methods",
    "06_sensitivity",
    "07_beyond",
    "08_graph",
)

#: What each notebook writes (toy world names; other models get a ``__<model>`` suffix):
#: figures as ``figures/<name>.{png,pdf}``, tables as ``figures/tables/<name>.{csv,md,tex}``.
#: (08_graph's screenshot ``toy_ioi_circuit`` needs a headless browser -- ``make browser`` -- so it
#: is regenerated only where one is set up and is not required here.)
FIGURES: dict[str, tuple[str, ...]] = {
    "00_toy_world": ("toy_clt_quality",),
    "01_prune": ("prune_kl_vs_k", "prune_kl_vs_kfrac", "prune_metrics_vs_kfrac"),
    "02_effective_budget": ("effective_budget", "effective_budget_k8_12", "seed_ablation"),
    "03_interpret": ("interpret_features_per_circuit",),
    "04_evaluate": ("fade_docstring_k50",),
    "05_related_methods": ("related_kl_vs_k", "related_cpr_cmd_runtime", "related_faithfulness_curves"),
    "06_sensitivity": ("sensitivity",),
    "07_beyond": ("beyond_kl_vs_k", "beyond_effective_budget"),
}
TABLES: dict[str, tuple[str, ...]] = {
    "00_toy_world": ("toy_world_card", "toy_world"),
    "01_prune": ("kl_table", "kl_table_small", "prune_metrics"),
    "02_effective_budget": (
        "effective_budget_means",
        "effective_budget",
        "effective_budget_means_k8_12",
        "effective_budget_k8_12",
        "seed_ablation",
    ),
    "03_interpret": ("interpret_descriptions", "interpret_cost_saving"),
    "04_evaluate": ("fade_docstring_k50", "paper_vs_ours"),
    "05_related_methods": ("related_kl_table", "related_cpr_cmd"),
    "06_sensitivity": ("sensitivity",),
    "07_beyond": ("beyond_kl_table", "beyond_effective_budget", "beyond_costs", "beyond_goal"),
}


def missing_outputs(name: str, figures: Path) -> list[str]:
    """The figure / table files notebook ``name`` should have written under ``figures`` and did not."""
    want = [figures / f"{f}.{ext}" for f in FIGURES.get(name, ()) for ext in ("png", "pdf")]
    want += [figures / "tables" / f"{t}.{ext}" for t in TABLES.get(name, ()) for ext in ("csv", "md", "tex")]
    return [str(p.relative_to(figures)) for p in want if not p.exists()]


def _value(text: str) -> Any:
    """``-p key=value``: a Python literal when it parses as one (3, 0.5, True, [1,2]), else the string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_params(items: Sequence[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"pie_lib.experiments.paper: -p {item!r}: expected key=value")
        key, val = item.split("=", 1)
        out[key.strip()] = _value(val.strip())
    return out


def select(only: Sequence[str] | None) -> list[str]:
    """Notebook names matching ``--only`` (full names or prefixes such as ``02``)."""
    if not only:
        return list(NOTEBOOKS)
    chosen = []
    for want in only:
        hits = [n for n in NOTEBOOKS if n == want or n.startswith(want)]
        if not hits:
            raise SystemExit(
                f"pie_lib.experiments.paper: no notebook named {want!r}; choose from {', '.join(NOTEBOOKS)}"
            )
        chosen += [h for h in hits if h not in chosen]
    return [n for n in NOTEBOOKS if n in chosen]


def declared_parameters(path: Path) -> set[str]:
    """Names assigned in the notebook's ``parameters`` cell."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if "parameters" in cell.get("metadata", {}).get("tags", []):
            names: set[str] = set()
            for node in ast.parse(cell.source).body:
                for t in node.targets if isinstance(node, ast.Assign) else []:
                    elts = t.elts if isinstance(t, ast.Tuple) else [t]
                    names.update(e.id for e in elts if isinstance(e, ast.Name))
            return names
    return set()


def run_notebook(
    name: str, executed: Path, params: dict[str, Any], kernel: str | None = None, log_output: bool = False
) -> float:
    """Execute ``notebooks/<name>.ipynb`` into ``executed/<name>.ipynb``; return seconds.

    Only parameters the notebook declares are passed. Raises papermill's execution error.
    """
    import papermill as pm

    src = NOTEBOOK_DIR / f"{name}.ipynb"
    declared = declared_parameters(src)
    executed.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    pm.execute_notebook(
        str(src),
        str(executed / f"{name}.ipynb"),
        parameters={k: v for k, v in params.items() if k in declared},
        kernel_name=kernel,
        cwd=str(REPO),
        progress_bar=False,
        log_output=log_output,
    )
    return time.perf_counter() - t0


def _error_line(exc: BaseException) -> str:
    ename, evalue = getattr(exc, "ename", type(exc).__name__), getattr(exc, "evalue", str(exc))
    return f"{ename}: {evalue}".strip().splitlines()[0][:500]


def _worker(
    name: str, executed: str, params: dict[str, Any], kernel: str | None, log_output: bool
) -> tuple[str, float, str | None]:
    """Run one notebook in a worker process: (name, seconds, None or the one-line error)."""
    t0 = time.perf_counter()
    try:
        run_notebook(name, Path(executed), params, kernel, log_output)
        return name, time.perf_counter() - t0, None
    except Exception as exc:  # papermill's PapermillExecutionError, a missing kernel...
        return name, time.perf_counter() - t0, _error_line(exc)


#: Which notebooks read the results of which (a notebook starts once these have finished).
DEPENDS: dict[str, tuple[str, ...]] = {
    "02_effective_budget": ("01_prune",),
    "03_interpret": ("01_prune",),
    "04_evaluate": ("03_interpret",),
    "05_related_methods": ("01_prune",),
}
#: Start order when several notebooks are ready: the longest chain (01 -> 05) first.
PRIORITY: tuple[str, ...] = (
    "01_prune",
    "07_beyond",
    "05_related_methods",
    "06_sensitivity",
    "03_interpret",
    "04_evaluate",
    "00_toy_world",
    "02_effective_budget",
)


def schedule(
    names: Sequence[str], run: Any, jobs: int = 2, keep_going: bool = False, log: Any = print
) -> tuple[dict[str, float], dict[str, str]]:
    """Run ``names`` with up to ``jobs`` at once, each after its :data:`DEPENDS` among ``names``.

    Args:
        run: ``run(name) -> Future`` of :func:`_worker`'s result (a process pool's submit).
    Returns:
        (seconds per finished notebook, one-line error per failed or not-run notebook).
    """
    from concurrent.futures import FIRST_COMPLETED, wait

    pending = sorted(names, key=lambda n: PRIORITY.index(n) if n in PRIORITY else len(PRIORITY))
    deps = {n: [d for d in DEPENDS.get(n, ()) if d in names] for n in names}
    done: dict[str, float] = {}
    failed: dict[str, str] = {}
    running: dict[Any, str] = {}
    while pending or running:
        stop = bool(failed) and not keep_going
        for n in list(pending):
            bad = [d for d in deps[n] if d in failed]
            if bad or stop:
                pending.remove(n)
                failed[n] = f"not run: {', '.join(bad)} failed" if bad else "not run: an earlier notebook failed"
            elif len(running) < jobs and all(d in done for d in deps[n]):
                pending.remove(n)
                log(f"[paper] {n} ...")
                running[run(n)] = n
        if not running:
            continue
        finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
        for fut in finished:
            running.pop(fut)
            name, secs, err = fut.result()
            if err is None:
                done[name] = secs
                log(f"[paper] {name}: {secs:.1f} s")
            else:
                done[name] = secs
                failed[name] = err
                log(f"[paper] {name}: FAILED after {secs:.1f} s -- {err}")
    return done, failed


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m pie_lib.experiments.paper",
        description=(__doc__ or "").split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--only",
        action="append",
        default=None,
        metavar="NAME",
        help="run only this notebook (name or prefix, e.g. 02); repeatable",
    )
    ap.add_argument("--tiny", action="store_true", help="CI smoke settings: few prompts, one seed, two methods")
    ap.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="put executed notebooks, figures, tables and runs under DIR (default: the repository)",
    )
    ap.add_argument("--fresh", action="store_true", help="delete the sweep folders first (recompute everything)")
    ap.add_argument(
        "-p",
        "--param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra notebook parameter (passed to every notebook that declares it)",
    )
    ap.add_argument("--jobs", type=int, default=2, help="notebooks run at once, respecting their order (default 2)")
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads per notebook (default 1: same numbers whatever --jobs is)"
    )
    ap.add_argument("--kernel", default=None, help="Jupyter kernel name (default: the notebook's)")
    ap.add_argument("--keep-going", action="store_true", help="run the remaining notebooks after a failure")
    ap.add_argument("--log-output", action="store_true", help="stream the notebooks' output")
    a = ap.parse_args(argv)

    import multiprocessing
    import os
    from concurrent.futures import ProcessPoolExecutor

    root = Path(a.out).resolve() if a.out else REPO
    executed = root / "notebooks" / "executed" if a.out else NOTEBOOK_DIR / "executed"
    figures = root / "figures"
    runs = root / "runs" / "paper"
    if a.fresh and runs.exists():
        shutil.rmtree(runs)
    # inside the repository the notebooks get relative paths (they run with cwd = the repository)
    shown = (lambda p: str(p.relative_to(REPO))) if not a.out else str
    params = {"figures": shown(figures), "out": shown(runs), "tiny": bool(a.tiny), **parse_params(a.param)}
    names = select(a.only)
    thread_vars = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
    saved = {v: os.environ.get(v) for v in thread_vars}
    os.environ.update({v: str(max(1, a.threads)) for v in thread_vars})  # inherited by workers and kernels
    t_all = time.perf_counter()
    try:
        with ProcessPoolExecutor(max_workers=max(1, a.jobs), mp_context=multiprocessing.get_context("spawn")) as pool:
            times, failed = schedule(
                names,
                lambda n: pool.submit(_worker, n, str(executed), params, a.kernel, a.log_output),
                jobs=max(1, a.jobs),
                keep_going=a.keep_going,
                log=lambda m: print(m, flush=True),
            )
    finally:
        for v, old in saved.items():
            if old is None:
                os.environ.pop(v, None)
            else:
                os.environ[v] = old
    total = time.perf_counter() - t_all
    print(f"\n[paper] time per notebook ({a.jobs} at a time, {a.threads} thread(s) each)")
    for name in names:
        if name in times:
            gone = missing_outputs(name, figures) if params.get("model", "toy") == "toy" and name not in failed else []
            note = "  FAILED" if name in failed else (f"  missing: {', '.join(gone)}" if gone else "")
            print(f"  {name:22s} {times[name]:8.1f} s{note}")
    print(f"  {'total (wall)':22s} {total:8.1f} s ({total / 60:.1f} min)")
    print(f"[paper] executed notebooks: {executed}\n[paper] figures: {figures}\n[paper] tables: {figures / 'tables'}")
    for name, line in failed.items():
        print(f"[paper] {name}: {line} (see {executed / (name + '.ipynb')})", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
