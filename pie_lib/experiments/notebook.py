"""Notebook plumbing: seeds, one-line errors, graceful skips.

``setup()`` is the first call of every paper notebook. It seeds Python, NumPy and torch, and
makes a :class:`~pie_lib.errors.PieError` (weights that cannot be fetched, a bad budget, a
results folder of another configuration...) show as one line -- ``WeightsUnavailableError:
model 'meta-llama/Llama-3.2-1B': ...`` -- instead of a stack trace, through IPython's
``set_custom_exc``. The cell still fails, so papermill still stops with a non-zero exit.
"""

from __future__ import annotations

import importlib
import logging
import os
import random
import sys
import warnings
from typing import Any

from pie_lib.errors import PieError

SKIP_BANNER = "SKIPPED"


def seed_everything(seed: int = 0) -> None:
    """Seed ``random``, NumPy and torch (CPU and CUDA)."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))


def _shell() -> Any:
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover - IPython ships with ipykernel
        return None
    return get_ipython()


def one_line_error(shell: Any, etype: type, value: BaseException, tb: Any, tb_offset: int | None = None) -> None:
    """IPython custom exception handler: show ``ErrorName: message`` and nothing else."""
    msg = f"{etype.__name__}: {value}"
    if hasattr(shell, "_showtraceback"):
        shell._showtraceback(etype, value, [msg])  # an error output papermill reports, one line long
    else:  # pragma: no cover
        print(msg, file=sys.stderr)
    return None


def setup(seed: int = 0, quiet: bool = True) -> None:
    """Prepare a paper notebook: seed everything, one-line PieErrors, tidy output.

    Args:
        seed: seed of Python, NumPy and torch.
        quiet: silence progress bars' logging noise and library warnings (ours included: the
            budget-clipping warning is reported in the tables instead).
    """
    seed_everything(seed)
    shell = _shell()
    if shell is not None:
        shell.set_custom_exc((PieError,), one_line_error)
    import pandas as pd

    pd.set_option("display.width", 160)
    pd.set_option("display.max_columns", 30)
    pd.set_option("display.precision", 4)
    if quiet:
        warnings.filterwarnings("ignore")
        logging.getLogger("pie_lib").setLevel(logging.ERROR)
        logging.getLogger("transformers").setLevel(logging.ERROR)
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
            hf_logging.set_verbosity_error()
        except ImportError:  # pragma: no cover
            pass


def available(module: str) -> bool:
    """Whether ``module`` imports (an optional stage of pie_lib that may not be installed yet)."""
    try:
        importlib.import_module(module)
        return True
    except ImportError:
        return False


def skip_notebook(reason: str) -> None:
    """Print ``SKIPPED: reason`` and turn every later cell of this notebook into a no-op.

    For a dependency that is missing (a stage of pie_lib not installed, the toy world not
    built): the notebook then finishes cleanly under papermill with the note in its output.
    """
    print(f"{SKIP_BANNER}: {reason}")
    shell = _shell()
    if shell is None:  # plain Python: nothing to skip
        return

    def noop(lines: list[str]) -> list[str]:
        return ["pass\n"]

    if noop not in shell.input_transformers_post:
        shell.input_transformers_post.append(noop)


def require(*modules: str, what: str | None = None) -> bool:
    """True if every module imports; otherwise :func:`skip_notebook` naming the missing ones."""
    missing = [m for m in modules if not available(m)]
    if missing:
        skip_notebook(f"{what or 'this notebook'} needs {', '.join(missing)}, which is not available yet")
        return False
    return True


__all__ = ["available", "one_line_error", "require", "seed_everything", "setup", "skip_notebook"]
