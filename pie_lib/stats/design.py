"""Which rows of a results table are independent: the prompt, not the copy of a prompt.

A sweep with a fixed ``--data-seed`` gives every seed the *same* prompts: a seed-independent
method then writes exact copies of its rows for every seed, and a seeded one (FAP-Synergy's partner
draws, the random baseline) differs across seeds only by its own draw noise. Treating the
``S x P`` rows as ``S x P`` units then overstates the evidence by up to a factor ``S``. With
``--data-seed -1`` each seed draws its own prompts, and the seeds are a second level above them.

:func:`detect_design` reads which case a set of rows is in and returns a :class:`Design`:

- ``"single seed"``: one seed; unit = prompt.
- ``"shared prompts"``: some prompt appears under several seeds. Unit = prompt; a prompt's value
  is the mean over its seeds, and the between-seed spread within a prompt is the seed component.
- ``"seed-specific prompts"``: every prompt appears under exactly one seed and there are several
  seeds. Unit = prompt nested in seed; inference adds a between-seed variance component
  (:mod:`pie_lib.stats.resample`).

Prompt identity: the first of :data:`PROMPT_ID_COLUMNS` the table has (``prompt_id`` is the hash
of the pair's texts and targets that ``pie prune`` writes). Without one, ``prompt_idx`` alone is the
identity, and the design's ``basis`` says so: rows with the same ``prompt_idx`` under different
seeds are then *assumed* to be the same prompt. That assumption is the safe one: if they were in
fact different prompts drawn independently, averaging them per index still gives independent units.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from pie_lib.errors import DataFormatError
from pie_lib.stats.resample import one_way_components

#: Columns that name a prompt's identity, most specific first.
PROMPT_ID_COLUMNS = ("prompt_id", "prompt_hash", "prompt_text", "text_clean", "prompt", "text")

SINGLE, SHARED, DISTINCT = "single seed", "shared prompts", "seed-specific prompts"
UNIT_PROMPT, UNIT_NESTED = "prompt", "prompt within seed"


def prompt_id_column(df: pd.DataFrame) -> str | None:
    """The column of ``df`` that identifies a prompt beyond its index, or None.

    A column with missing values (rows of an older sweep, written before ``prompt_id`` existed)
    does not identify every prompt and is not used.
    """
    return next((c for c in PROMPT_ID_COLUMNS if c in df.columns and df[c].notna().all()), None)


@dataclass(frozen=True)
class Design:
    """How the rows of one comparison group into independent units.

    Attributes:
        case: ``"single seed"``, ``"shared prompts"`` or ``"seed-specific prompts"``.
        unit: ``"prompt"`` (seeds averaged within a prompt) or ``"prompt within seed"``.
        basis: what decided prompt identity (a column name, or ``"prompt_idx (no prompt id column)"``).
        n_prompts: distinct prompts. n_seeds: distinct seeds. n_rows: rows.
        prompt: ``[n_rows]`` int, the prompt (0..n_prompts-1) of each row, in row order.
        seed: ``[n_rows]`` int, the seed of each row.
    """

    case: str
    unit: str
    basis: str
    n_prompts: int
    n_seeds: int
    n_rows: int
    prompt: np.ndarray
    seed: np.ndarray

    @property
    def nested(self) -> bool:
        """True when the seeds are a level above the prompts (seed-specific prompts)."""
        return self.case == DISTINCT

    def info(self) -> dict[str, int | str]:
        """The fields every result reports: ``n_prompts, n_seeds, unit, design``."""
        return {"n_prompts": self.n_prompts, "n_seeds": self.n_seeds, "unit": self.unit, "design": self.case}

    def unit_groups(self) -> np.ndarray:
        """``[n_units]`` stratum of each unit: the seed index (nested) or 0 (prompt units)."""
        if not self.nested:
            return np.zeros(self.n_prompts, dtype=np.int64)
        first = np.zeros(self.n_prompts, dtype=np.int64)
        first[self.prompt] = self.seed
        return np.unique(first, return_inverse=True)[1]


def detect_design(
    seed: np.ndarray, prompt_idx: np.ndarray, prompt_key: np.ndarray | None = None, basis: str | None = None
) -> Design:
    """The :class:`Design` of rows with these seeds, prompt indexes and (optional) prompt ids.

    Args:
        seed, prompt_idx: ``[n_rows]`` per row. prompt_key: ``[n_rows]`` prompt identity (text or
            hash) or None (``prompt_idx`` is the identity). basis: the key's column name.
    Raises:
        DataFormatError: the same (seed, prompt_idx) names two different prompts, or some prompts
            are shared across seeds and others are not (restrict ``seeds=`` to one design).
    """
    seed = np.asarray(seed, dtype=np.int64)
    prompt_idx = np.asarray(prompt_idx, dtype=np.int64)
    if prompt_key is None:
        key = pd.Series(prompt_idx).astype(str).to_numpy()
        basis = "prompt_idx (no prompt id column)"
    else:
        key = pd.Series(prompt_key).astype(str).to_numpy()
        basis = basis or "prompt id"
        unit_code = pd.factorize(pd.MultiIndex.from_arrays([seed, prompt_idx]))[0]
        pairs = np.unique(np.stack([unit_code, pd.factorize(key)[0]]), axis=1)
        clash = np.flatnonzero(np.bincount(pairs[0]) > 1)
        if clash.size:
            row = int(np.flatnonzero(unit_code == clash[0])[0])
            s, p = seed[row], prompt_idx[row]
            raise DataFormatError(
                f"seed {s}, prompt_idx {p} names two different prompts ({basis} differs); "
                "the results table mixes runs: load one sweep folder at a time"
            )
    codes, uniq = pd.factorize(key)
    pairs = np.unique(np.stack([codes, seed]), axis=1)
    seeds_per_prompt = np.bincount(pairs[0], minlength=len(uniq))
    n_seeds = int(np.unique(seed).size)
    if n_seeds == 1:
        case, unit = SINGLE, UNIT_PROMPT
    elif np.all(seeds_per_prompt == 1):
        case, unit = DISTINCT, UNIT_NESTED
    elif np.all(seeds_per_prompt > 1) or prompt_key is None:
        # by index alone a partial overlap is still "the same index = the same prompt"
        case, unit = SHARED, UNIT_PROMPT
    else:
        raise DataFormatError(
            f"{int((seeds_per_prompt > 1).sum())} prompts appear under several seeds and "
            f"{int((seeds_per_prompt == 1).sum())} under one only; pass seeds=... so the compared rows either "
            "share their prompts or each seed has its own"
        )
    return Design(case, unit, basis, int(len(uniq)), n_seeds, int(seed.size), codes.astype(np.int64), seed)


def unit_matrix(x: np.ndarray, design: Design) -> np.ndarray:
    """Per-unit values: ``x`` ``[n_rows, ...]`` averaged over the rows of each prompt.

    Returns:
        ``[n_prompts, ...]``: for shared prompts, the mean over the prompt's seeds; otherwise each
        row is its own unit (same values, ordered by prompt code).
    """
    x = np.asarray(x, dtype=np.float64)
    flat = x.reshape(x.shape[0], -1)
    sums = np.zeros((design.n_prompts, flat.shape[1]))
    np.add.at(sums, design.prompt, flat)
    counts = np.bincount(design.prompt, minlength=design.n_prompts).astype(np.float64)
    return (sums / counts[:, None]).reshape((design.n_prompts, *x.shape[1:]))


def seed_spread(x: np.ndarray, design: Design) -> float:
    """The seed component of ``x`` ``[n_rows]``: how much the seeds alone move a value.

    - shared prompts: the pooled within-prompt sd over seeds,
      ``sqrt(sum_p sum_s (x_ps - xbar_p)^2 / sum_p (S_p - 1))`` (partner draws, the random
      baseline's draw; 0 for a deterministic method);
    - seed-specific prompts: the between-seed sd component of a one-way random-effects model,
      ``sqrt(max(0, (MSB - MSW) / n0))``;
    - one seed: NaN.
    """
    x = np.asarray(x, dtype=np.float64)
    if design.case == SINGLE:
        return float("nan")
    if design.case == SHARED:
        means = unit_matrix(x, design)
        counts = np.bincount(design.prompt, minlength=design.n_prompts)
        dof = int((counts - 1).sum())
        if dof == 0:
            return float("nan")
        return float(np.sqrt(((x - means[design.prompt]) ** 2).sum() / dof))
    return float(np.sqrt(one_way_components(unit_matrix(x, design), design.unit_groups())["var_between"]))
