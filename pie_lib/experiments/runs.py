"""Where the paper notebooks put their sweeps, and the sweeps they run.

Folder layout (``runs`` defaults to ``runs/paper``)::

    <runs>/<world>/<notebook>/<task>/     one resumable pie prune folder per task
    <runs>/<world>/06_sensitivity/<task>/lam<λ>_bp<bp>/

``<world>`` is :func:`slug` of the model ("toy" for the embedded toy world, "Llama-3.2-1B" for
``meta-llama/Llama-3.2-1B``...), so a real run never mixes with the toy results, and figures of a
real run get the slug as a suffix (:func:`fig_name`) instead of overwriting the toy figures.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import pandas as pd

from pie_lib.errors import WeightsUnavailableError
from pie_lib.toy import toy_arch

if TYPE_CHECKING:
    from pie_lib.clt.transcoder import CrossLayerTranscoder
    from pie_lib.models.loading import LoadedModel


def slug(model: str) -> str:
    """A folder-safe name of a model: ``toy``, ``toy-gpt2``, ``Llama-3.2-1B``."""
    if model == "toy":
        return "toy"
    if model.startswith("toy:"):
        return "toy-" + model.split(":", 1)[1]
    name = Path(str(model).rstrip("/")).name or str(model)
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name)


def run_dir(runs: str | Path, notebook: str, model: str, task: str | None = None) -> Path:
    """``<runs>/<slug(model)>/<notebook>[/<task>]``."""
    p = Path(runs) / slug(model) / notebook
    return p / task if task else p


def fig_name(name: str, model: str) -> str:
    """``name`` for the toy world, ``name__<slug>`` for any other model."""
    s = slug(model)
    return name if s == "toy" else f"{name}__{s}"


def toy_world_missing(model: str, clt: str) -> str | None:
    """None if the checkpoints can be looked for; a note if "toy" is asked and not built.

    An unknown toy arch ("toy:nosuch") is bad input, not a missing world: it raises.
    """
    from pie_lib.toy import resolve_toy

    kinds: tuple[tuple[str, Literal["model", "clt"]], ...] = ((model, "model"), (clt, "clt"))
    paths = [resolve_toy(x, kind) for x, kind in kinds if toy_arch(x) is not None]
    missing = [p for p in paths if not Path(p).exists()]
    if missing:
        return f"the toy world is not built ({missing[0]} is missing); run `make toy` (python -m pie_lib.toy.build)"
    return None


def toy_summary_or_none(model: str) -> dict | None:
    """The build's numbers of the toy arch ``model`` names (``toy_summary()["archs"][arch]``), or
    None for a model that is not the toy world or a toy world without a summary."""
    arch = toy_arch(model)
    if arch is None:
        return None
    from pie_lib.toy import toy_summary

    try:
        return toy_summary().get("archs", {}).get(arch)
    except FileNotFoundError:
        return None


def fade_protocol(
    name: str = "pie", seed: int = 0, steer_prompts: int | None = None, gen_tokens: int | None = None
) -> Any:
    """The FADE :class:`~pie_lib.evaluate.ProtocolConfig` ``name`` with a lighter faithfulness
    (steering) step when ``steer_prompts`` / ``gen_tokens`` are given -- the step that costs most
    on CPU (every factor x prompt x token is a forward)."""
    from pie_lib.evaluate import ProtocolConfig

    pc = ProtocolConfig.named(name)
    pc.seed = int(seed)
    if steer_prompts is not None:
        pc.n_steer_prompts = int(steer_prompts)
    if gen_tokens is not None:
        pc.gen_tokens = int(gen_tokens)
    return pc


def interpret_corpus(source: str = "toy", n_docs: int = 2000) -> Any:
    """The :class:`pie_lib.interpret.CorpusConfig` of a corpus name and document count."""
    from pie_lib.interpret import CorpusConfig

    return CorpusConfig(source=source, n_docs=int(n_docs))


def load_world(
    model: str = "toy", clt: str = "toy", device: str | None = None, remote: bool = False, model_backend: str = "auto"
) -> tuple[LoadedModel, CrossLayerTranscoder]:
    """Load the model (nnsight) and its CLT once, for every sweep of a notebook (``model_backend``:
    ``load_model``'s backend; "hf" for a notebook that steers, as the native backend does not generate).

    Raises:
        WeightsUnavailableError: the toy world is not built, or weights cannot be fetched.
    """
    from pie_lib.world import load_world as load

    note = toy_world_missing(model, clt)
    if note:
        raise WeightsUnavailableError(note)
    world = load(model, clt, device=device, remote=remote, backend=model_backend)
    return world.model, world.clt


def prune_config(
    model: str = "toy",
    clt: str = "toy",
    task: str = "ioi",
    methods: Sequence[str] = ("fap", "fap-synergy", "clt-relp", "act-mag", "random"),
    k: Sequence[int] = (50, 75, 100, 200, 400, 800),
    k_frac: Sequence[float] = (),
    seeds: Sequence[int] = (0, 1, 2),
    n: int = 32,
    device: str | None = None,
    remote: bool = False,
    out: str | Path = "runs/prune",
    lam: float | None = None,
    bp: float | None = None,
    extra: dict | None = None,
    chunk: int = 512,
    batch_size: int = 16,
) -> Any:
    """A :class:`~pie_lib.prune.sweep.PruneConfig` from notebook parameters (paper defaults for
    everything else; ``lam`` / ``bp`` override FAP-Synergy's λ and boundary percent; ``chunk``
    only changes speed, never results)."""
    from pie_lib.prune.context import ScoringConfig
    from pie_lib.prune.params import MethodParams
    from pie_lib.prune.select import SynergyConfig
    from pie_lib.prune.sweep import PruneConfig

    syn = SynergyConfig()
    if lam is not None:
        syn.lam = float(lam)
    if bp is not None:
        syn.boundary_percent = float(bp)
    return PruneConfig(
        model=model,
        clt=clt,
        task=cast(Literal["ioi", "docstring"], task),  # an unknown task is refused when its pairs are generated
        n=int(n),
        methods=list(methods),
        k=[int(x) for x in k],
        k_frac=[float(x) for x in k_frac],
        seeds=[int(s) for s in seeds],
        out=str(out),
        device=device,
        remote=bool(remote),
        batch_size=batch_size,
        scoring=ScoringConfig(chunk=chunk),
        params=MethodParams(synergy=syn, extra=dict(extra or {})),
        progress=False,
    )


def prune_tasks(
    tasks: Iterable[str],
    runs: str | Path,
    notebook: str,
    world: tuple[Any, Any] | None = None,
    seeds_by_task: dict[str, Sequence[int]] | None = None,
    **params: Any,
) -> pd.DataFrame:
    """Run (or resume) one sweep per task into ``run_dir(runs, notebook, model, task)``; all rows.

    Args:
        tasks: "ioi", "docstring". runs, notebook: where (see the module doc).
        world: ``(model, clt)`` already loaded by :func:`load_world` (else loaded per sweep).
        seeds_by_task: seeds of a task other than ``params["seeds"]`` (e.g. one seed for Doc-String).
        params: :func:`prune_config` arguments (model, clt, methods, k, k_frac, seeds, n...).
    """
    from pie_lib.prune.sweep import run_prune

    frames = []
    model_name = params.get("model", "toy")
    for task in tasks:
        p = dict(params)
        if seeds_by_task and task in seeds_by_task:
            p["seeds"] = seeds_by_task[task]
        cfg = prune_config(task=task, out=run_dir(runs, notebook, model_name, task), **p)
        lm, tc = world if world is not None else (None, None)
        frames.append(run_prune(cfg, model=lm, clt=tc))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def sensitivity_grid(
    lams: Sequence[float],
    bps: Sequence[float],
    runs: str | Path,
    notebook: str = "06_sensitivity",
    task: str = "ioi",
    baseline: str | None = "fap",
    world: tuple[Any, Any] | None = None,
    **params: Any,
) -> pd.DataFrame:
    """FAP-Synergy over a λ × boundary-percent grid (one resumable folder per grid point).

    The baseline (plain FAP, identical at every grid point) is run once, in the first folder.

    Returns:
        The rows of every folder with columns ``lam`` and ``bp`` added (baseline rows carry the
        first grid point's values).
    """
    from pie_lib.prune.sweep import run_prune

    frames = []
    base = run_dir(runs, notebook, params.get("model", "toy"), task)
    lm, tc = world if world is not None else (None, None)
    first = True
    for lam in lams:
        for bp in bps:
            methods = ["fap-synergy"] + ([baseline] if baseline and first else [])
            cfg = prune_config(
                task=task,
                methods=methods,
                out=base / f"lam{lam:g}_bp{bp:g}",
                lam=lam,
                bp=bp,
                **{k: v for k, v in params.items() if k != "methods"},
            )
            df = run_prune(cfg, model=lm, clt=tc)
            frames.append(df.assign(lam=float(lam), bp=float(bp)))
            first = False
    return pd.concat(frames, ignore_index=True)


def select_rows(
    df: pd.DataFrame,
    k: Sequence[int] | None = None,
    k_frac: Sequence[float] | None = None,
    seeds: Sequence[int] | None = None,
    methods: Sequence[str] | None = None,
) -> pd.DataFrame:
    """The sweep rows on a given ladder (absolute ``k`` and fractional ``k_frac``), seeds and methods
    -- a folder holds every row ever computed in it, a notebook compares methods on one ladder."""
    keep = pd.Series(True, index=df.index)
    if k is not None or k_frac is not None:
        abs_ok = (df["budget"] == "abs") & df["k"].isin([float(x) for x in (k or [])])
        frac_ok = (df["budget"] == "frac") & df["k"].round(9).isin([round(float(x), 9) for x in (k_frac or [])])
        keep &= abs_ok | frac_ok
    if seeds is not None:
        keep &= df["seed"].isin(list(seeds))
    if methods is not None:
        keep &= df["method"].isin(list(methods))
    return cast(pd.DataFrame, df[keep]).reset_index(drop=True)


def write_selections(records: Iterable[dict], path: str | Path) -> Path:
    """Write selection records as JSONL (the input format of ``pie interpret``), atomically."""
    from pie_lib.store import write_jsonl

    return write_jsonl(path, records)


__all__ = [
    "fade_protocol",
    "fig_name",
    "interpret_corpus",
    "load_world",
    "toy_arch",
    "toy_summary_or_none",
    "prune_config",
    "prune_tasks",
    "run_dir",
    "select_rows",
    "sensitivity_grid",
    "slug",
    "toy_world_missing",
    "write_selections",
]
