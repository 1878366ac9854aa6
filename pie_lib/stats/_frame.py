"""Selecting and pairing cells of a results table (one row per method, K, seed, prompt).

A *cell* is ``(method, k)``. A *unit* is ``(seed, prompt_idx)``: rows of different cells with the
same unit are the same prompt, which is what makes every comparison here paired.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import cast

import numpy as np
import pandas as pd

from pie_lib.errors import BudgetError, DataFormatError
from pie_lib.stats.design import Design, detect_design, prompt_id_column

Cell = tuple[str, int]
UNIT = ["seed", "prompt_idx"]


class MissingResultError(BudgetError, ValueError):
    """A requested method, budget K or seed has no rows in the results table."""


class UnpairedDataError(DataFormatError, ValueError):
    """Two cells that must be compared prompt by prompt do not hold the same (seed, prompt_idx)."""


def _fmt(values: Iterable[object], limit: int = 12) -> str:
    vals = sorted(set(values), key=lambda v: (str(type(v)), v))
    text = ", ".join(repr(v) if isinstance(v, str) else str(v) for v in vals[:limit])
    return f"[{text}{', ...' if len(vals) > limit else ''}]"


def check_columns(df: pd.DataFrame, cols: Sequence[str]) -> None:
    """Raise :class:`DataFormatError` naming the columns of ``cols`` that ``df`` lacks."""
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise DataFormatError(
            f"results table lacks column(s) {missing}; it has {list(df.columns)} "
            "(expected one row per method, k, seed, prompt_idx)"
        )


def values_of(df: pd.DataFrame, value: str) -> np.ndarray:
    """``df[value]`` as float64 (bools become 0/1); raise if it holds NaN."""
    x = df[value].to_numpy(dtype=np.float64)
    bad = int(np.isnan(x).sum())
    if bad:
        raise DataFormatError(f"column {value!r} holds {bad} NaN value(s); drop or fix those rows first")
    return x


def check_cell(df: pd.DataFrame, method: str, k: int | None = None, seeds: Sequence[int] | None = None) -> None:
    """Raise :class:`MissingResultError` if ``method`` (at ``k``, for ``seeds``) has no rows."""
    mask = df["method"].to_numpy() == method
    if not mask.any():
        methods = df["method"].unique()
        raise MissingResultError(f"method {method!r} is not in the results; methods present: {_fmt(methods)}")
    rows = df[mask]
    if k is not None and k not in set(rows["k"].tolist()):
        raise MissingResultError(f"method {method!r} has no rows at K={k}; its budgets: {_fmt(rows['k'].tolist())}")
    if seeds is not None:
        if k is not None:
            rows = rows[rows["k"] == k]
        have = set(rows["seed"].tolist())
        lack = [s for s in seeds if s not in have]
        if lack:
            where = f"{method!r} at K={k}" if k is not None else repr(method)
            raise MissingResultError(f"{where} has no rows for seed(s) {lack}; its seeds: {_fmt(have)}")


def cell_keys(df: pd.DataFrame, method: str, k: int, seeds: Sequence[int] | None = None) -> pd.Series | None:
    """The prompt identity (:data:`~pie_lib.stats.design.PROMPT_ID_COLUMNS`) of cell ``(method, k)``
    indexed by unit ``(seed, prompt_idx)``, or None when the table has no such column."""
    col = prompt_id_column(df)
    if col is None:
        return None
    mask = (df["method"].to_numpy() == method) & (df["k"].to_numpy() == k)
    if seeds is not None:
        mask &= np.isin(df["seed"].to_numpy(), list(seeds))
    seed = df["seed"].to_numpy(dtype=np.int64)[mask]
    pidx = df["prompt_idx"].to_numpy(dtype=np.int64)[mask]
    keys = df[col].to_numpy()[mask].astype(str)
    order = np.lexsort((pidx, seed))
    index = pd.MultiIndex.from_arrays([seed[order], pidx[order]], names=UNIT)
    return pd.Series(keys[order], index=index, name=col)


def design_of(index: pd.MultiIndex, keys: pd.Series | None) -> Design:
    """The :class:`~pie_lib.stats.design.Design` of units ``index`` (seed, prompt_idx) with prompt ids ``keys``."""
    seed = index.get_level_values("seed").to_numpy()
    pidx = index.get_level_values("prompt_idx").to_numpy()
    if keys is None:
        return detect_design(seed, pidx)
    keys = keys if keys.index.equals(index) else keys.reindex(index)
    return detect_design(seed, pidx, keys.to_numpy(), basis=str(keys.name))


def cell_values(df: pd.DataFrame, method: str, k: int, value: str, seeds: Sequence[int] | None = None) -> pd.Series:
    """The ``value`` of cell ``(method, k)`` as a float Series indexed by unit ``(seed, prompt_idx)``.

    Raises:
        MissingResultError: the method, K or a requested seed is absent.
        DataFormatError: a unit appears twice in the cell, or the value holds NaN.
    """
    check_columns(df, ["method", "k", *UNIT, value])
    check_cell(df, method, k, seeds)
    mask = (df["method"].to_numpy() == method) & (df["k"].to_numpy() == k)
    if seeds is not None:
        mask &= np.isin(df["seed"].to_numpy(), list(seeds))
    rows = df.loc[mask]
    seed = rows["seed"].to_numpy(dtype=np.int64)
    pidx = rows["prompt_idx"].to_numpy(dtype=np.int64)
    order = np.lexsort((pidx, seed))
    seed, pidx = seed[order], pidx[order]
    dup = np.zeros(seed.size, dtype=bool)
    dup[1:] = (seed[1:] == seed[:-1]) & (pidx[1:] == pidx[:-1])
    if dup.any():
        ex = list(zip(seed[dup].tolist(), pidx[dup].tolist()))[:3]
        raise DataFormatError(
            f"cell ({method!r}, K={k}) has {int(dup.sum())} duplicated (seed, prompt_idx) row(s), e.g. {ex}"
        )
    index = pd.MultiIndex.from_arrays([seed, pidx], names=UNIT)
    return pd.Series(values_of(rows, value)[order], index=index, name=f"{method}@{k}")


def require_same_units(left: pd.Index, right: pd.Index, what_left: str, what_right: str) -> None:
    """Raise :class:`UnpairedDataError` unless the two unit indexes hold the same (seed, prompt_idx)."""
    if left.equals(right):
        return
    only_l = left.difference(right)
    only_r = right.difference(left)
    if len(only_l) or len(only_r):
        parts = []
        if len(only_l):
            parts.append(f"{len(only_l)} only in {what_left} (e.g. {list(only_l[:3])})")
        if len(only_r):
            parts.append(f"{len(only_r)} only in {what_right} (e.g. {list(only_r[:3])})")
        raise UnpairedDataError(
            f"{what_left} and {what_right} are not paired: (seed, prompt_idx) units "
            + "; ".join(parts)
            + ". Pass seeds=... to restrict to shared seeds, or rerun the missing prompts"
        )


def paired_cells(df: pd.DataFrame, a: Cell, b: Cell, value: str, seeds: Sequence[int] | None = None) -> pd.DataFrame:
    """Cells ``a`` and ``b`` side by side, matched on ``(seed, prompt_idx)``.

    Returns:
        DataFrame indexed by unit, columns ``a``, ``b`` (floats), sorted by unit.
    Raises:
        UnpairedDataError: the two cells do not cover the same units.
    """
    va = cell_values(df, a[0], a[1], value, seeds)
    vb = cell_values(df, b[0], b[1], value, seeds)
    require_same_units(va.index, vb.index, f"({a[0]!r}, K={a[1]})", f"({b[0]!r}, K={b[1]})")
    out = pd.DataFrame({"a": va, "b": vb.reindex(va.index)})
    ka, kb = cell_keys(df, a[0], a[1], seeds), cell_keys(df, b[0], b[1], seeds)
    if ka is not None and kb is not None:  # both or neither: one prompt id column for the table
        kb = kb if kb.index.equals(ka.index) else kb.reindex(ka.index)
        differ = ka != kb
        if differ.any():
            ex = [unit for unit, bad in zip(ka.index, differ.to_numpy()) if bad][:3]
            raise UnpairedDataError(
                f"({a[0]!r}, K={a[1]}) and ({b[0]!r}, K={b[1]}) hold different prompts under the same "
                f"(seed, prompt_idx) for {int(differ.sum())} unit(s), e.g. {ex} ({ka.name} differs); "
                "compare rows of one sweep folder"
            )
    out.attrs["keys"] = ka  # read by paired_units; dropped by any later pandas operation
    return out


def paired_units(
    df: pd.DataFrame, a: Cell, b: Cell, value: str, seeds: Sequence[int] | None = None
) -> tuple[pd.DataFrame, Design]:
    """:func:`paired_cells` and the :class:`~pie_lib.stats.design.Design` of its units."""
    pair = paired_cells(df, a, b, value, seeds)
    keys = pair.attrs.pop("keys", None)
    return pair, design_of(cast(pd.MultiIndex, pair.index), keys)  # cell_values indexes by unit


def method_curve_matrix(
    df: pd.DataFrame, method: str, ks: Sequence[int], value: str, seeds: Sequence[int]
) -> pd.DataFrame:
    """``value`` of ``method`` at every K of ``ks``: DataFrame indexed by unit, one column per K.

    Raises:
        MissingResultError: a K or seed is absent for the method.
        UnpairedDataError: the K's do not all cover the same units.
    """
    cols = {}
    first = None
    for k in ks:
        v = cell_values(df, method, int(k), value, seeds)
        if first is None:
            first = v
        else:
            require_same_units(first.index, v.index, f"({method!r}, K={ks[0]})", f"({method!r}, K={k})")
            v = v.reindex(first.index)
        cols[int(k)] = v
    return pd.DataFrame(cols)
