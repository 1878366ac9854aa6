"""Start-up cost: ``pie --help`` must not import torch, transformers, nnsight or pandas."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "nnsight", "pandas")


@pytest.mark.parametrize("argv", [["--help"], ["prune", "--help"], ["interpret", "--help"]])
def test_help_imports_nothing_heavy(argv):
    code = (
        "import sys\n"
        f"sys.argv = ['pie'] + {argv!r}\n"
        "try:\n"
        "    import pie_lib.__main__\n"
        "except SystemExit:\n"
        "    pass\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]", out
