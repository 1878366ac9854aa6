"""The configs of ``pie prune``: plain dataclasses with documented fields and ``__post_init__`` checks.

No torch, pandas or model code is imported here (``pie prune --help`` derives its flags from these
fields, see :mod:`pie_lib.cli.fields`). The old homes re-export them: ``prune.context.ScoringConfig``,
``prune.select.SynergyConfig``, ``prune.params.MethodParams``, ``prune.sweep.PruneConfig``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from pie_lib.errors import BudgetError, SettingError
from pie_lib.prune.defaults import DEFAULT_LADDER, DEFAULT_METHODS, DEFAULT_TASK_PAIRS

if TYPE_CHECKING:
    import torch


def _float32() -> torch.dtype:
    import torch  # only when a config is made, never on --help

    return torch.float32


@dataclass
class ScoringConfig:
    """How FAP is computed and how removals are evaluated (paper defaults).

    Attributes:
        gradient: FAP's gradient: "replacement" (through the replacement model; paper) or "full"
            (through the original model).
        corruption: the corrupted activation a_corr: "corrupted" (from the corrupted prompt; paper)
            or "zero".
        metric: "logit_diff" (paper, IOI/Doc-String) or "logsumexp" (reference flag default).
        zero_bos: exclude position 0 (BOS), as the paper does.
        chunk: patch variants per forward (default: sized from free memory and prompt length).
        rows_dtype: dtype of decoder rows used in scores and offsets (torch.float32).
    """

    gradient: Literal["replacement", "full"] = "replacement"
    corruption: Literal["corrupted", "zero"] = "corrupted"  # = prune.occurrences.Corruption
    metric: Literal["logit_diff", "logsumexp"] = "logit_diff"  # = engine.traces.MetricKind
    zero_bos: bool = True
    chunk: int | None = None
    rows_dtype: torch.dtype = field(default_factory=_float32)


@dataclass
class SynergyConfig:
    """FAP-Synergy parameters; defaults are the paper's (reference script: λ=5, bp=50).

    Attributes:
        lam: FAP-Synergy λ, the weight of the synergy term (paper 3.0; reference script 5.0).
        boundary_percent: FAP-Synergy bp, the percent of the budget reranked around the boundary
            (paper 25; script 50).
        boundary_cap: most boundary candidates reranked per prompt.
        partners: partners drawn per refresh.
        partners_per_candidate: partners each candidate's synergy is measured with.
        seed: seed of the partner draws (set per sweep seed).
        precision: dtype of FAP-Synergy's M(.) forwards: "float32" whatever the model's dtype (a
            bfloat16 model is upcast for the reranking and restored exactly after), or "model" (the
            reference's reduced precision).
        eff_tol: FAP-Synergy uses Syn(c, p) only where both single effects exceed this (paper: > 0);
            a noise tolerance for M(.) in reduced precision.
    """

    lam: float = 3.0
    boundary_percent: float = 25.0
    boundary_cap: int = 32
    partners: int = 32
    partners_per_candidate: int = 8
    seed: int = 0
    precision: Literal["float32", "model"] = "float32"
    eff_tol: float = 0.0

    def __post_init__(self) -> None:
        if self.precision not in ("float32", "model"):
            raise SettingError(f"--synergy-precision {self.precision!r}: use 'float32' or 'model'")
        if not self.eff_tol >= 0:
            raise SettingError(f"--synergy-eff-tol {self.eff_tol}: must be >= 0")


@dataclass
class MethodParams:
    """Hyper-parameters of the methods (paper defaults). Fields are CLI flags of ``pie prune``.

    Attributes:
        synergy: FAP-Synergy's parameters.
        signal_gamma: FAP-Signal γ in (0, 0.5).
        acdc_tau: ACDC threshold on KL increase.
        extra: hyper-parameters of registered related methods (``--param KEY=VALUE``).
    """

    synergy: SynergyConfig = field(default_factory=SynergyConfig)
    signal_gamma: float = 0.2
    acdc_tau: float | None = None
    extra: dict = field(default_factory=dict)


@dataclass
class PruneConfig:
    """One ``pie prune`` run. Field names are the CLI flags.

    Attributes:
        model: HF folder or hub id; "toy" or "toy:gpt2" for the embedded toy world.
        clt: CLT folder or hub id (circuit-tracer format); "toy" for the toy world.
        data: JSONL of pairs (text_clean, text_corr, io_clean, s_clean), or None to generate
            ``task`` pairs.
        task: generate pairs of this task.
        n: number of pairs: the first N of --data (default: every pair of the file), or N
            generated pairs of --task (default 32).
        data_seed: seed of generated pairs (default 0); None (-1 on the CLI) = each sweep seed
            draws its own prompts; not with --data.
        methods: comma list of registry names; see `pie methods`.
        k: budgets K (occurrences per prompt), clipped to the active set with a warning.
        k_frac: budgets as fractions of each prompt's active set (the toy world is small).
        seeds: seeds of the sweep (partner draws, random baseline, generated prompts).
        out: output folder (results.parquet, selections.jsonl).
        device: cpu, cuda, cuda:1 (default: cuda if available).
        dtype: float32 / bfloat16 (default: float32 on CPU, bfloat16 on GPU).
        remote: run every trace on NDIF (nnsight remote execution).
        model_backend: auto (default: pie_lib's own model code for a local GPT-2 / Llama / Gemma-2 folder run
            here, transformers otherwise), native or hf; the results are the same bits either way.
        batch_size: pairs per batch.
        min_tokens: skip prompts shorter than this (reference: 8).
        target_token: "single": a target must be one token (default); "last": score a multi-token
            target by its last token (the reference's behaviour; the pairs affected are printed and
            counted in config.json).
        cut_corrupted: cut corrupted prompts longer than their clean prompt to the clean length (the
            reference's behaviour; default: a length mismatch is an error); the pairs cut are
            printed and counted in config.json.
        scoring: how FAP is computed and removals evaluated.
        params: hyper-parameters of the methods.
        progress: show progress bars.
        shard: "I/N" computes part I of N (0-based; e.g. $SLURM_ARRAY_TASK_ID/8) into
            out/shards/shard-I-of-N/; combine with `pie merge`. None = the whole sweep.
    """

    model: str = "toy"
    clt: str = "toy"
    data: str | None = None
    task: Literal["ioi", "docstring"] = "ioi"
    n: int | None = None
    data_seed: int | None = 0
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    k: list[int] = field(default_factory=lambda: list(DEFAULT_LADDER))
    k_frac: list[float] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    out: str = "runs/prune"
    device: str | None = None
    dtype: str | None = None
    remote: bool = False
    model_backend: Literal["auto", "native", "hf"] = "auto"
    batch_size: int = 16
    min_tokens: int = 0
    target_token: Literal["single", "last"] = "single"
    cut_corrupted: bool = False
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    params: MethodParams = field(default_factory=MethodParams)
    progress: bool = True
    shard: str | None = None

    def __post_init__(self) -> None:
        """A config that cannot run is refused when it is made (the method names are checked
        against the registry by ``run_prune``, once the plugins are loaded)."""
        self.ladder()
        self.validate()

    def ladder(self) -> list[tuple[str, float]]:
        """Budget labels and values: ("50", 50) for absolute, ("f0.05", 0.05) for fractions."""
        if not self.k and not self.k_frac:
            raise BudgetError("empty K ladder; pass --k 50,75,... and/or --k-frac 0.05,...")
        bad = [k for k in self.k if not isinstance(k, int) or k <= 0]
        if bad:
            raise BudgetError(f"budgets {bad} must be positive integers; use --k-frac for fractions")
        badf = [f for f in self.k_frac if not 0 < f <= 1]
        if badf:
            raise BudgetError(f"budget fractions {badf} must be in (0, 1]")
        return [(str(k), float(k)) for k in self.k] + [(f"f{f:g}", float(f)) for f in self.k_frac]

    def validate(self) -> None:
        """Refuse settings that cannot run, before anything is loaded or written."""
        from pie_lib.prune.extra import check_extra
        from pie_lib.prune.registry import load_plugins

        if not self.seeds:
            raise BudgetError("no seeds given; pass --seeds 0,1,2")
        for flag, value in (("--data", self.data), ("--out", self.out), ("--model", self.model), ("--clt", self.clt)):
            if value is not None and not str(value).strip():
                raise SettingError(f"{flag} '' is empty; pass a path (or leave {flag} out for its default)")
        if self.n is not None and (isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1):
            raise SettingError(
                f"--n {self.n}: the number of pairs must be a positive integer (leave --n out to use every pair "
                "of --data)"
            )
        if self.model_backend not in ("auto", "native", "hf"):
            raise SettingError(f"--model-backend {self.model_backend!r}: expected auto, native or hf")
        if self.remote and self.model_backend == "native":
            raise SettingError(
                "--model-backend native runs the model here, but --remote runs it on NDIF; drop one of them"
            )
        if self.target_token not in ("single", "last"):
            raise SettingError(f"--target-token {self.target_token!r}: expected single (default) or last")
        for flag, values in (("--seeds", self.seeds), ("--k", self.k), ("--k-frac", self.k_frac)):
            dup = sorted({v for v in values if list(values).count(v) > 1})
            if dup:
                raise BudgetError(f"{flag}: {dup} listed twice; give each value once")
        bad_seeds = [s for s in self.seeds if isinstance(s, bool) or not isinstance(s, int)]
        if bad_seeds:
            raise BudgetError(f"--seeds {bad_seeds}: seeds must be integers")
        load_plugins()  # every plugin's --param prefixes are known
        check_extra(self.params.extra)
        for flag, value in (("--batch-size", self.batch_size), ("--chunk", self.scoring.chunk)):
            if flag == "--chunk" and value is None:  # sized from free memory and sequence length
                continue
            if not isinstance(value, int) or value < 1:
                raise SettingError(f"{flag} {value}: must be a positive integer")
        if self.min_tokens < 0:
            raise SettingError(f"--min-tokens {self.min_tokens}: must be >= 0")
        syn = self.params.synergy
        if not 0 <= syn.boundary_percent <= 100:
            raise SettingError(f"--boundary-percent {syn.boundary_percent:g}: must be in [0, 100]")
        for flag, value in (
            ("--boundary-cap", syn.boundary_cap),
            ("--partners", syn.partners),
            ("--partners-per-candidate", syn.partners_per_candidate),
        ):
            if value < 0:
                raise SettingError(f"{flag} {value}: must be >= 0")
        if not math.isfinite(syn.lam):
            raise SettingError(f"--lambda-syn {syn.lam}: must be a finite number")
        if "fap-signal" in self.methods and not 0 < self.params.signal_gamma < 0.5:
            raise BudgetError(f"FAP-Signal gamma={self.params.signal_gamma:g} must be in (0, 0.5); pass --gamma 0.2")

    def identity(self) -> dict[str, Any]:
        """Fields that must match for rows of one folder to be comparable."""
        sc = dataclasses.asdict(self.scoring)
        sc["rows_dtype"] = str(self.scoring.rows_dtype)
        sc.pop("chunk")
        return {
            "model": self.model,
            "clt": self.clt,
            "data": self.data,
            "task": None if self.data else self.task,
            "n": self.n_pairs,
            "data_seed": self.data_seed,
            "min_tokens": self.min_tokens,
            "scoring": sc,
            "params": {**dataclasses.asdict(self.params)},
            # the reference-behaviour flags change which tokens are used; recorded only when on, so
            # folders written before the flags existed still resume
            **({"target_token": self.target_token} if self.target_token != "single" else {}),
            **({"cut_corrupted": True} if self.cut_corrupted else {}),
        }

    @property
    def n_pairs(self) -> int | None:
        """Pairs per seed: ``n``, else every pair of ``data`` (None) or ``DEFAULT_TASK_PAIRS`` generated."""
        if self.n is not None:
            return self.n
        return None if self.data else DEFAULT_TASK_PAIRS
