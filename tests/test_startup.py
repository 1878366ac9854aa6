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


def test_exit_now_keeps_the_code_output_and_atexit():
    """``pie`` leaves without the interpreter's teardown, but with its exit code, flushed output and
    atexit handlers; with a worker thread still running it exits normally (the thread is joined)."""
    code = (
        "import atexit, sys, threading, time, torch\n"
        "from pie_lib.cli.app import exit_now\n"
        "atexit.register(lambda: print('atexit ran'))\n"
        "sys.stdout.write('unflushed')\n"
        "if sys.argv[1] == 'thread':\n"
        "    threading.Thread(target=lambda: (time.sleep(0.5), print('thread done'))).start()\n"
        "exit_now(3)\n"
    )
    for mode, tail in (("plain", "unflushedatexit ran"), ("thread", "thread done")):
        p = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True)
        assert p.returncode == 3, p.stderr
        assert tail in p.stdout.replace("\n", ""), p.stdout
