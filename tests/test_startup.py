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


def test_prune_run_imports_no_pandas(tmp_path):
    """``pie prune`` writes its tables and prints its summary without pandas (~0.3 s to import;
    pyarrow's own ``pa.array`` would import it too); the tables read back as the pandas path's.
    FAP-Synergy's medians do not import ``numpy.ma`` (np.median's first call does, ~0.14 s)."""
    out = tmp_path / "run"
    code = (
        "import sys\n"
        "from pie_lib.cli.app import main\n"
        f"rc = main(['prune', '--n', '2', '--methods', 'fap,fap-synergy', '--k', '5', '--seeds', '0', '--out', "
        f"{str(out)!r}, '--no-progress'])\n"
        "print(rc, 'pandas' in sys.modules, 'numpy.ma' in sys.modules)\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().splitlines()[-1] == "0 False False", p.stdout
    assert "count" in p.stdout and "fap" in p.stdout  # the KL summary table

    import pandas as pd
    import pyarrow.parquet as pq

    from pie_lib.prune.results import load_results, load_selections
    from pie_lib.selections import selections_table

    rows = load_results(out)
    got = pd.read_parquet(out / "results.parquet")
    pd.testing.assert_frame_equal(got, rows)
    assert len(got) == 4 and got["kl"].dtype == "float64" and got["k"].dtype == "int64"
    sel = selections_table(load_selections(out))
    # without pandas' metadata the object string columns read back as pandas' str dtype
    want = sel.astype({"method": "str", "budget": "str"})
    pd.testing.assert_frame_equal(pd.read_parquet(out / "selections.parquet"), want)
    # the arrow schema pandas itself would write (less pandas' own metadata)
    for name, frame in (("results", rows), ("selections", sel)):
        written = pq.read_schema(out / f"{name}.parquet").remove_metadata()
        assert written == pa_schema_of(frame), name


def pa_schema_of(frame):
    import pyarrow as pa

    return pa.Schema.from_pandas(frame, preserve_index=False).remove_metadata()
