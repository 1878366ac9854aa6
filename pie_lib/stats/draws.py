"""The bootstrap's random draws: the seeded index matrix and its count matrix (leaf module).

Every resampling routine of :mod:`pie_lib.stats` draws from here, so this module imports nothing
of :mod:`pie_lib.stats` (the package's imports form a DAG:
``draws <- resample <- design <- _frame <- bootstrap <- paired/equivalence/budget/... <- tables``).
"""

from __future__ import annotations

import numpy as np


def bootstrap_indices(n: int, n_boot: int, seed: int) -> np.ndarray:
    """The resampling index matrix.

    Args:
        n: number of units (prompts); n_boot: number of resamples; seed: generator seed.
    Returns:
        ``idx`` ``[n_boot, n]`` int64, ``idx[b]`` = the n units of resample b (with replacement).
    """
    if n <= 0:
        raise ValueError(f"cannot bootstrap over n={n} units")
    if n_boot <= 0:
        raise ValueError(f"n_boot={n_boot} must be a positive integer")
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n), dtype=np.int64)


def bootstrap_weights(idx: np.ndarray, n: int) -> np.ndarray:
    """Counts ``W[b, j] = #{i : idx[b, i] = j}`` of an index matrix ``idx`` ``[n_boot, n]``.

    The mean of any per-unit quantity ``x`` ``[n, ...]`` over resample b is then ``(W @ x)[b] / n``.
    """
    n_boot = idx.shape[0]
    flat = (idx + n * np.arange(n_boot, dtype=np.int64)[:, None]).ravel()
    return np.bincount(flat, minlength=n_boot * n).reshape(n_boot, n).astype(np.float64)
