"""``--remote`` when the NDIF server cannot be reached: one line naming the server and the fix."""

from __future__ import annotations

import nnsight.modeling.huggingface as nnsight_hf
from nnsight import CONFIG

from pie_lib.cli import main


def test_unreachable_server_is_one_line(tiny_worlds, tmp_path, capsys, monkeypatch):
    w = tiny_worlds["gpt2"]
    model = str(w.model_dir)
    monkeypatch.setitem(nnsight_hf._ID_CACHE, model, model)  # offline: no Hub to canonicalise a local id
    monkeypatch.setattr(CONFIG.API, "HOST", "http://127.0.0.1:9")  # nothing listens there
    out = tmp_path / "out"
    args = ["prune", "--remote", "--model", model, "--clt", str(w.clt_dir), "--data", str(w.pairs_path)]
    rc = main([*args, "--n", "2", "--methods", "fap", "--k", "2", "--seeds", "0", "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert "NDIF server at http://127.0.0.1:9" in err[0] and "without --remote" in err[0]
    assert not out.exists()  # the server's precision is asked before anything is written
