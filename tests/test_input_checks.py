"""Nothing silent (issue 13): ambiguous input is an error naming file, line and fix; the
reference's behaviours only by explicit flags; one folder, one writer; hub revisions recorded.

The CLI-level cases (non-zero exit, one line, nothing left behind) are in ``bad_inputs.CASES``,
run by ``test_reliability.py``; this file tests the pieces and the flag paths.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pie_lib.clt.io import load_clt, read_config
from pie_lib.data.pairs import Pair, load_pairs
from pie_lib.errors import CLTFormatError, DataFormatError, FolderBusyError, SettingError, ShapeMismatchError
from pie_lib.prune.occurrences import tokenize_pairs
from pie_lib.store import folder_lock, lock_path, read_jsonl, repair_jsonl


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from conftest import build_world

    return build_world(tmp_path_factory.mktemp("inp_world"), "llama")


# ----------------------------------------------------------------------------- targets and lengths
def _pairs_file(tmp_path: Path, pairs: list[dict]) -> Path:
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return path


def _pair(clean="w1 w2 w3 w4 w5 w6", corr="w1 w2 w9 w4 w8 w6", io=" w30", s=" w22") -> dict:
    return {"text_clean": clean, "text_corr": corr, "io_clean": io, "s_clean": s}


def test_multi_token_target_is_an_error_naming_file_line_and_flag(world, tmp_path):
    path = _pairs_file(tmp_path, [_pair(), _pair(), _pair(io=" w3 w17")])
    pairs = load_pairs(path)
    with pytest.raises(
        ShapeMismatchError,
        match=r"pairs\.jsonl:3: pair 2: io_clean ' w3 w17' is 2 tokens.*"
        r"--target-token last",
    ):
        tokenize_pairs(world.model, pairs)
    tok = tokenize_pairs(world.model, pairs, target_token="last")
    assert tok.n_last_token_targets == 1 and tok.n_cut_corrupted == 0
    vocab = world.model.tokenizer.get_vocab()
    b = next(b for b in tok.batches if 2 in b.prompt_idx.tolist())
    assert int(b.correct[b.prompt_idx.tolist().index(2)]) == vocab["w17"]


def test_corrupted_of_another_length_is_an_error_unless_cut(world, tmp_path):
    longer = _pair(corr="w1 w9 w3 w8 w5 w6 w7 w0")
    path = _pairs_file(tmp_path, [_pair(), longer, longer])
    pairs = load_pairs(path)
    with pytest.raises(
        ShapeMismatchError,
        match=r"pairs\.jsonl:2: pair 1: corrupted prompt has 9 tokens but the "
        r"clean prompt has 7.*--cut-corrupted",
    ):
        tokenize_pairs(world.model, pairs)
    tok = tokenize_pairs(world.model, pairs, cut_corrupted=True)
    assert tok.n_cut_corrupted == 2 and tok.n_last_token_targets == 0
    b = tok.batches[0]
    assert b.clean_ids.shape == b.corr_ids.shape == (3, 7)
    assert b.corr_ids[1].tolist() == world.model.tokenize([longer["text_corr"]])[0][:7]
    shorter = [Pair("w1 w2 w3 w4 w5 w6", "w1 w2 w3", " w5", " w6")]
    with pytest.raises(ShapeMismatchError, match="pair 0: corrupted prompt has 4 tokens"):
        tokenize_pairs(world.model, shorter, cut_corrupted=True)  # a shorter one cannot be cut


def test_equal_targets_and_empty_prompt_are_errors(world):
    with pytest.raises(ShapeMismatchError, match=r"pair 0: io_clean ' w5' and s_clean ' w5' are the same token"):
        tokenize_pairs(world.model, [Pair("w1 w2 w3", "w1 w4 w3", " w5", " w5")])
    with pytest.raises(ShapeMismatchError, match=r"same token"):  # last tokens equal
        tokenize_pairs(world.model, [Pair("w1 w2 w3", "w1 w4 w3", " w6 w5", " w5")], target_token="last")
    with pytest.raises(ShapeMismatchError, match=r"pair 0: the clean prompt '  ' tokenises to nothing"):
        tokenize_pairs(world.model, [Pair("  ", "w1", " w5", " w6")])


def test_tokenizer_without_bos_is_refused(world, tmp_path):
    from pie_lib.models.loading import load_model

    m = Path(shutil.copytree(world.model_dir, tmp_path / "model"))
    cfg = json.loads((m / "tokenizer_config.json").read_text())
    cfg["bos_token"] = None
    (m / "tokenizer_config.json").write_text(json.dumps(cfg))
    model = load_model(m, device="cpu")
    assert model.tokenizer.bos_token_id is None
    with pytest.raises(SettingError, match=r"tokenizer of model .* has no BOS token.*bos_token"):
        tokenize_pairs(model, world.pairs[:2])


# ----------------------------------------------------------------------------- CLT config
def _clt_copy(world, tmp_path, config: dict | None) -> Path:
    c = Path(shutil.copytree(world.clt_dir, tmp_path / "clt"))
    if config is None:
        (c / "config.yaml").unlink()
    else:
        (c / "config.yaml").write_text(yaml.safe_dump(config))
    return c


GOOD = {
    "model_kind": "cross_layer_transcoder",
    "feature_input_hook": "hook_resid_mid",
    "feature_output_hook": "hook_mlp_out",
}


@pytest.mark.parametrize(
    "config, pattern",
    [
        (None, r"config\.yaml: missing; pie_lib does not guess.*model_kind.*feature_input_hook"),
        ({k: v for k, v in GOOD.items() if k != "model_kind"}, r"config\.yaml: no model_kind"),
        ({k: v for k, v in GOOD.items() if k != "feature_input_hook"}, r"config\.yaml: no feature_input_hook"),
        ({**GOOD, "feature_input_hook": "hook_resid_pre"}, r"feature_input_hook 'hook_resid_pre' is not supported"),
        ({**GOOD, "feature_output_hook": 7}, r"feature_output_hook 7 is not supported"),
        ({**GOOD, "activation": "topk"}, r"activation topk needs k"),
        ({**GOOD, "activation": "topk", "k": 0}, r"activation topk needs k.*got 0"),
        ({**GOOD, "activation": "topk", "k": 4}, r"activation topk, but the weights store JumpReLU thresholds"),
        ({**GOOD, "activation": ["relu"]}, r"activation \['relu'\] must be a name"),
        ({**GOOD, "model_name": {"a": 1}}, r"model_name .* must be a string"),
    ],
)
def test_clt_config_nothing_guessed(world, tmp_path, config, pattern):
    with pytest.raises(CLTFormatError, match=pattern):
        load_clt(_clt_copy(world, tmp_path, config))


def test_clt_config_accepts_block_templated_hooks(tmp_path):
    (tmp_path / "config.yaml").write_text(
        yaml.safe_dump(
            {
                "model_kind": "transcoder_set",
                "feature_input_hook": "blocks.{layer}.hook_resid_mid",
                "feature_output_hook": "blocks.{layer}.hook_mlp_out",
            }
        )
    )
    assert read_config(tmp_path).model_kind == "transcoder_set"
    (tmp_path / "config.yaml").write_bytes(b"model_kind: \xff\xfe\n")
    with pytest.raises(CLTFormatError, match=r"config\.yaml: not UTF-8"):
        read_config(tmp_path)


# ----------------------------------------------------------------------------- data file
@pytest.mark.parametrize(
    "text, pattern",
    [
        (
            '{"text_clean": "a", "text_clean": "b", "text_corr": "c", "io_clean": " d", "s_clean": " e"}\n',
            r"p\.jsonl:1: key 'text_clean' is given twice",
        ),
        (
            '{"text_clean": "a\\ud800", "text_corr": "c", "io_clean": " d", "s_clean": " e"}\n',
            r"p\.jsonl:1: text_clean holds an invalid Unicode escape",
        ),
        ('"just a string"\n', r"p\.jsonl:1: expected a JSON object.*got a JSON str"),
        (
            '{"text_clean": ["a"], "text_corr": "c", "io_clean": " d", "s_clean": " e"}\n',
            r"p\.jsonl:1: key\(s\) \['text_clean'\] must be non-empty strings \(got text_clean=\['a'\]\)",
        ),
        ("\ufeff" + json.dumps(_pair()) + "\n", r"p\.jsonl:1: invalid JSON \(Unexpected UTF-8 BOM"),
    ],
)
def test_data_file_errors_name_file_and_line(tmp_path, text, pattern):
    (tmp_path / "p.jsonl").write_text(text, encoding="utf-8", errors="surrogatepass")
    with pytest.raises(DataFormatError, match=pattern):
        load_pairs(tmp_path / "p.jsonl")


def test_pairs_remember_their_line(tmp_path):
    path = _pairs_file(tmp_path, [_pair(), _pair(io=" w1")])
    (tmp_path / "q.jsonl").write_text("\n\n" + path.read_text().replace("\n", "\r\n"))
    assert [p.where for p in load_pairs(tmp_path / "q.jsonl")] == [
        f"{tmp_path / 'q.jsonl'}:3",
        f"{tmp_path / 'q.jsonl'}:4",
    ]
    assert "where" not in load_pairs(path)[0].to_json()


# ----------------------------------------------------------------------------- store: repair, lock
def test_repair_keeps_every_finished_row(tmp_path):
    p = tmp_path / "results.jsonl"
    rows = [{"i": i, "x": "é" * i} for i in range(5)]
    good = "".join(json.dumps(r) + "\n" for r in rows).encode()
    p.write_bytes(good + b'{"i": 5, "x": "\xc3')  # a kill in the middle of a multi-byte character
    assert read_jsonl(p) == rows
    assert repair_jsonl(p) == len(b'{"i": 5, "x": "\xc3')
    assert p.read_bytes() == good and repair_jsonl(p) == 0


def _hold_lock(folder: str, ready, release) -> None:
    with folder_lock(folder, what="pie prune (test holder)"):
        ready.set()
        release.wait(60)


def test_second_writer_is_refused_naming_the_live_pid(tmp_path):
    ctx = mp.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_hold_lock, args=(str(tmp_path), ready, release))
    proc.start()
    try:
        assert ready.wait(60)
        with pytest.raises(FolderBusyError, match=rf"being written by another run .*PID {proc.pid}\b.*kill {proc.pid}"):
            with folder_lock(tmp_path):
                pass
        with folder_lock(tmp_path, shard="1/4"):  # another shard of the same folder is another writer
            assert lock_path(tmp_path, "1/4").name == ".pie.lock.shard-1-of-4"
            with pytest.raises(FolderBusyError):
                with folder_lock(tmp_path, shard="1/4"):
                    pass
    finally:
        release.set()
        proc.join(60)
    with folder_lock(tmp_path):  # released: free again
        pass
    assert not lock_path(tmp_path).exists()


def test_stale_lock_of_a_killed_run_is_taken_over(tmp_path):
    code = (
        "import sys, time; from pie_lib.store import folder_lock\n"
        "with folder_lock(sys.argv[1]):\n    print('locked', flush=True); time.sleep(60)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert proc.stdout.readline().strip() == "locked"
    with pytest.raises(FolderBusyError, match=f"PID {proc.pid}"):
        with folder_lock(tmp_path):
            pass
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert json.loads(lock_path(tmp_path).read_text())["pid"] == proc.pid  # the killed run's lock is left
    with pytest.warns(UserWarning, match=rf"took over the stale lock of PID {proc.pid}"):
        with folder_lock(tmp_path):
            assert json.loads(lock_path(tmp_path).read_text())["pid"] == os.getpid()
    # a lock file naming a live PID but not held (no flock) is stale too: flock is what counts
    lock_path(tmp_path).write_text(json.dumps({"pid": 1}))
    with pytest.warns(UserWarning, match="stale lock of PID 1"):
        with folder_lock(tmp_path):
            pass
    time.sleep(0)


# ----------------------------------------------------------------------------- whole runs (Python API)
def _cfg(world, out, **kw):
    from pie_lib.prune.sweep import PruneConfig

    base = dict(
        model=str(world.model_dir),
        clt=str(world.clt_dir),
        data=str(world.pairs_path),
        methods=["fap", "random"],
        k=[5],
        seeds=[0],
        out=str(out),
        batch_size=8,
        progress=False,
    )
    return PruneConfig(**{**base, **kw})


def test_data_file_is_used_whole_unless_n(world, tmp_path, capsys):
    from pie_lib.prune.sweep import run_prune

    df = run_prune(_cfg(world, tmp_path / "all"), model=world.model, clt=world.clt)
    assert sorted(df.prompt_idx.unique()) == list(range(len(world.pairs))) == list(range(8))
    assert f"using all 8 pairs of {world.pairs_path}" in capsys.readouterr().out
    df = run_prune(_cfg(world, tmp_path / "three", n=3), model=world.model, clt=world.clt)
    assert sorted(df.prompt_idx.unique()) == [0, 1, 2]
    assert "using the first 3 of the 8 pairs" in capsys.readouterr().out
    with pytest.raises(DataFormatError, match=r"--n 9: .*pairs\.jsonl holds only 8 pair\(s\)"):
        run_prune(_cfg(world, tmp_path / "nine", n=9), model=world.model, clt=world.clt)
    assert not (tmp_path / "nine").exists()
    conf = json.loads((tmp_path / "all" / "config.json").read_text())
    assert conf["inputs"]["n_pairs"] == conf["inputs"]["n_pairs_in_file"] == 8
    assert conf["identity"]["n"] is None


def test_reference_flags_count_the_pairs_they_touch(world, tmp_path, capsys):
    from pie_lib.prune.sweep import run_prune

    rows = [
        _pair(),
        _pair(io=" w3 w17"),
        _pair(corr="w1 w9 w3 w8 w5 w6 w7"),
        _pair(corr="w1 w9 w3 w8 w5 w6 w7 w0"),
        _pair(clean="w1 w2 w3 w4 w5 w7", corr="w1 w2 w3 w4 w5 w8"),
    ]
    data = _pairs_file(tmp_path, rows)
    with pytest.raises(ShapeMismatchError, match=r"pairs\.jsonl:2: pair 1: io_clean ' w3 w17' is 2 tokens"):
        run_prune(_cfg(world, tmp_path / "o", data=str(data)), model=world.model, clt=world.clt)
    with pytest.raises(ShapeMismatchError, match=r"pairs\.jsonl:3: pair 2: corrupted prompt has 8 tokens"):
        run_prune(_cfg(world, tmp_path / "o", data=str(data), target_token="last"), model=world.model, clt=world.clt)
    assert not (tmp_path / "o").exists()
    capsys.readouterr()
    df = run_prune(
        _cfg(world, tmp_path / "o", data=str(data), target_token="last", cut_corrupted=True),
        model=world.model,
        clt=world.clt,
    )
    assert sorted(df.prompt_idx.unique()) == [0, 1, 2, 3, 4]
    out = capsys.readouterr().out
    assert "--target-token last: 1 pair(s) had a multi-token target" in out
    assert "--cut-corrupted: 2 corrupted prompt(s) were cut" in out
    conf = json.loads((tmp_path / "o" / "config.json").read_text())
    assert conf["inputs"]["n_last_token_targets"] == 1 and conf["inputs"]["n_cut_corrupted"] == 2
    assert conf["identity"]["target_token"] == "last" and conf["identity"]["cut_corrupted"] is True
    # the same folder without the flags is another configuration
    from pie_lib.errors import ConfigMismatchError

    with pytest.raises(ConfigMismatchError, match="cut_corrupted"):
        run_prune(_cfg(world, tmp_path / "o", data=str(data), target_token="last"), model=world.model, clt=world.clt)


def test_identical_clean_and_corrupted_is_refused(world, tmp_path):
    from pie_lib.prune.sweep import run_prune

    data = _pairs_file(tmp_path, [_pair(), _pair(corr="w1 w2 w3 w4 w5 w6")])
    with pytest.raises(
        ShapeMismatchError,
        match=r"pairs\.jsonl:2: pair 1: the clean and corrupted prompts are the "
        r"same tokens",
    ):
        run_prune(_cfg(world, tmp_path / "o", data=str(data)), model=world.model, clt=world.clt)
    df = run_prune(
        _cfg(
            world,
            tmp_path / "z",
            data=str(data),
            scoring=__import__("pie_lib.prune.context", fromlist=["ScoringConfig"]).ScoringConfig(corruption="zero"),
        ),
        model=world.model,
        clt=world.clt,
    )
    assert len(df) == 4


def _topk_clt(world, folder: Path, k: int) -> Path:
    from safetensors.torch import load_file, save_file

    c = Path(shutil.copytree(world.clt_dir, folder))
    for i in range(world.clt.n_layers):
        t = load_file(str(c / f"W_enc_{i}.safetensors"))
        t[f"b_enc_{i}"] = -t.pop(f"threshold_{i}")  # a shifted ReLU keeps roughly the same features firing
        save_file(t, str(c / f"W_enc_{i}.safetensors"))
    (c / "config.yaml").write_text(yaml.safe_dump({**GOOD, "activation": "topk", "k": k}))
    return c


def _plt(world, folder: Path) -> Path:
    from safetensors.torch import load_file, save_file

    folder.mkdir()
    for i in range(world.clt.n_layers):
        e = load_file(str(world.clt_dir / f"W_enc_{i}.safetensors"))
        d = load_file(str(world.clt_dir / f"W_dec_{i}.safetensors"))[f"W_dec_{i}"]
        save_file(
            {
                "W_enc": e[f"W_enc_{i}"],
                "b_enc": e[f"b_enc_{i}"],
                "b_dec": e[f"b_dec_{i}"],
                "W_dec": d[:, 0].contiguous(),
                "activation_function.threshold": e[f"threshold_{i}"],
            },
            str(folder / f"layer_{i}.safetensors"),
        )
    (folder / "config.yaml").write_text(yaml.safe_dump({**GOOD, "model_kind": "transcoder_set"}))
    return folder


@pytest.mark.parametrize("kind", ["topk", "plt"])
def test_topk_clt_and_plt_set_run_correctly(world, tmp_path, kind):
    """Both load as what they are, and a full sweep runs: keeping every active occurrence reproduces
    the clean metric (a wrong activation or decoder layout would not), fewer move away from it."""
    import torch

    from pie_lib.prune.sweep import run_prune

    folder = _topk_clt(world, tmp_path / "clt", k=3) if kind == "topk" else _plt(world, tmp_path / "clt")
    clt = load_clt(folder)
    if kind == "topk":
        assert clt.config.activation == "topk" and clt.threshold is None
        x = torch.randn(clt.n_layers, 7, clt.d_model) * 10
        assert ((clt.encode(x) != 0).sum(-1) <= 3).all()
    else:
        assert not clt.config.is_cross_layer and clt.n_out(0) == 1 and clt.config.activation == "jumprelu"
    cfg = _cfg(world, tmp_path / "o", clt=str(folder), k=[2, 100000], methods=["fap", "random", "act-mag"])
    with pytest.warns(UserWarning, match="clipped"):
        df = run_prune(cfg)
    assert len(df) == 3 * 2 * 8 and df.kl.notna().all()
    full = df[df.k == 100000]
    assert (full.n_kept == full.n_active).all() and (full.n_active > 0).all()
    torch.testing.assert_close(
        torch.tensor(full.m_circuit.values), torch.tensor(full.m_clean.values), atol=1e-3, rtol=1e-3
    )
    assert (full.kl < 1e-4).all()
    small = df[df.k == 2]
    assert (small.n_kept == 2).all() and (small.kl > full.kl.max()).any()


def test_read_only_out(world, tmp_path):
    from pie_lib.errors import OutputPathError
    from pie_lib.prune.sweep import run_prune

    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        writable = os.access(ro, os.W_OK)  # root may write anyway: then the run must simply work
        cfg = _cfg(world, ro / "out", methods=["fap"], n=2)
        if writable:
            assert len(run_prune(cfg, model=world.model, clt=world.clt)) == 2
        else:  # pragma: no cover - non-root
            with pytest.raises(OutputPathError, match="is not writable"):
                run_prune(cfg, model=world.model, clt=world.clt)
    finally:
        ro.chmod(0o755)
    if Path("/sys").is_dir() and _unwritable("/sys"):  # a real read-only place: the error path
        with pytest.raises(OutputPathError, match=r"--out /sys/pie_out: /sys is not writable"):
            run_prune(_cfg(world, "/sys/pie_out", n=2), model=world.model, clt=world.clt)


def _unwritable(folder: str) -> bool:
    import tempfile

    try:
        fd, p = tempfile.mkstemp(dir=folder)
    except OSError:
        return True
    os.close(fd)
    os.unlink(p)
    return False


def test_a_live_writer_blocks_the_folder_for_the_api(world, tmp_path):
    from pie_lib.prune.sweep import run_prune

    out = tmp_path / "o"
    out.mkdir()
    with folder_lock(out):
        with pytest.raises(FolderBusyError, match=rf"PID {os.getpid()}"):
            run_prune(_cfg(world, out, n=2), model=world.model, clt=world.clt)
        assert sorted(p.name for p in out.iterdir()) == [".pie.lock"]
    assert len(run_prune(_cfg(world, out, n=2), model=world.model, clt=world.clt)) == 4
    assert not (out / ".pie.lock").exists()


# ----------------------------------------------------------------------------- hub ids: revision, offline
def _fake_hub_cache(hf_home: Path, repo_id: str, src: Path, sha: str) -> None:
    """Lay ``src``'s files out as the Hugging Face cache does after a download of ``repo_id``."""
    repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(sha)
    shutil.copytree(src, repo / "snapshots" / sha)


def test_hub_checkpoints_are_recorded_with_their_commit(world, tmp_path):
    import bad_inputs as bi

    hf = tmp_path / "hf"
    msha, csha = "a" * 40, "0123456789abcdef0123456789abcdef01234567"
    _fake_hub_cache(hf, "pie-test/tiny-llama", world.model_dir, msha)
    _fake_hub_cache(hf, "pie-test/tiny-clt", world.clt_dir, csha)
    env = {
        **os.environ,
        **bi.SUBPROCESS_ENV,
        "HF_HOME": str(hf),
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join(sys.path),
    }
    out = tmp_path / "o"
    args = [
        "prune",
        "--model",
        "pie-test/tiny-llama",
        "--clt",
        "pie-test/tiny-clt",
        "--data",
        str(world.pairs_path),
        "--n",
        "2",
        "--methods",
        "fap",
        "--k",
        "5",
        "--seeds",
        "0",
        "--device",
        "cpu",
        "--out",
        str(out),
        "--no-progress",
    ]
    p = subprocess.run([sys.executable, "-m", "pie_lib", *args], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    conf = json.loads((out / "config.json").read_text())
    assert conf["model_source"] == {"id": "pie-test/tiny-llama", "revision": msha}
    assert conf["clt_source"] == {"id": "pie-test/tiny-clt", "revision": csha}
    # an id that is not in the cache, offline: one line, the weights are not reachable, nothing written
    bad = [a if a != "pie-test/tiny-llama" else "pie-test/no-such-model" for a in args]
    bad[bad.index("--out") + 1] = str(tmp_path / "o2")
    p = subprocess.run([sys.executable, "-m", "pie_lib", *bad], capture_output=True, text=True, env=env, timeout=300)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2 and len(lines) == 1, p.stderr
    assert re.search(r"model 'pie-test/no-such-model': weights not reachable -- the hub is switched off", lines[0])
    assert not (tmp_path / "o2").exists()


def test_hub_revision_reader(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from pie_lib.provenance import hub_revision, revision_from_snapshot

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    repo = tmp_path / "hub" / "models--o--m" / "refs"
    repo.mkdir(parents=True)
    (repo / "main").write_text("c" * 40 + "\n")
    assert hub_revision("o/m") == "c" * 40
    assert hub_revision("o/other") is None  # offline and not cached: unknown, never guessed
    assert hub_revision("o/m", revision="d" * 40) == "d" * 40
    assert revision_from_snapshot(tmp_path / "snapshots" / ("e" * 40) / "x") == "e" * 40
    assert revision_from_snapshot(tmp_path) is None


def test_selections_of_another_world_are_refused(world, tmp_path, tiny_worlds):
    from pie_lib.errors import ConfigMismatchError
    from pie_lib.provenance import check_same_world
    from pie_lib.prune.sweep import run_prune

    out = tmp_path / "o"
    run_prune(_cfg(world, out, n=2), model=world.model, clt=world.clt)
    sel = out / "selections.jsonl"
    check_same_world(sel, world.model_dir, world.clt_dir)  # the same world: fine
    other = tiny_worlds["gpt2"]
    with pytest.raises(ConfigMismatchError, match=r"selections\.jsonl were made with CLT .*clt.*not .*; pass --clt"):
        check_same_world(sel, world.model_dir, other.clt_dir)
    with pytest.raises(ConfigMismatchError, match=r"made with model .*; pass --model"):
        check_same_world(sel, other.model_dir, world.clt_dir)
    check_same_world(tmp_path / "handmade" / "selections.jsonl", other.model_dir, other.clt_dir)  # nothing recorded


def test_read_parquet_refuses_damaged_tables(tmp_path):
    import pandas as pd

    from pie_lib.store import read_parquet

    p = tmp_path / "descriptions.parquet"
    pd.DataFrame({"layer": [0], "feature": [1], "description": ["x"]}).to_parquet(p)
    assert len(read_parquet(p, "descriptions table", "rerun", ["layer", "feature"])) == 1
    with pytest.raises(DataFormatError, match="lacks column.*'status'"):
        read_parquet(p, "descriptions table", "rerun", ["layer", "status"])
    p.write_bytes(p.read_bytes()[:40])
    with pytest.raises(DataFormatError, match=r"descriptions\.parquet: not a readable parquet file"):
        read_parquet(p, "descriptions table", "rerun `pie interpret`")
    p.write_text("layer,feature\n0,1\n")
    with pytest.raises(DataFormatError, match="not a readable parquet file"):
        read_parquet(p, "descriptions table", "rerun `pie interpret`")


# ----------------------------------------------------------------------------- pie interpret / pie evaluate
def _files(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


def _one_error_line(capsys, rc, command: str, pattern: str) -> None:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"pie {command}: error: ") and re.search(pattern, lines[0]), lines[0]


@pytest.mark.parametrize("damage", ["garbage", "truncated", "csv", "no_columns", "bad_config"])
def test_evaluate_refuses_a_corrupt_descriptions_table(tmp_path, capsys, damage):
    import pandas as pd

    from pie_lib.cli import main

    d = tmp_path / "interp"
    d.mkdir()
    p = d / "descriptions.parquet"
    pd.DataFrame({"layer": [0, 1], "feature": [3, 4], "description": ["a", "b"]}).to_parquet(p)
    pattern = r"descriptions\.parquet: not a readable parquet file"
    if damage == "garbage":
        p.write_bytes(b"\x00\x01 not parquet at all" * 10)
    elif damage == "truncated":
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    elif damage == "csv":
        p.write_text("layer,feature,description\n0,3,a\n")
    elif damage == "no_columns":
        pd.DataFrame({"layer": [0]}).to_parquet(p)
        pattern = r"descriptions table .* lacks column\(s\) \['feature', 'description'\]"
    else:
        (d / "interpret_config.json").write_text('{"model": ')
        pattern = r"interpret_config\.json: corrupt"
    before = _files(tmp_path)
    rc = main(["evaluate", "--descriptions", str(p), "--no-progress"])
    _one_error_line(capsys, rc, "evaluate", pattern)
    assert _files(tmp_path) == before


def test_interpret_refuses_selections_of_another_model_or_clt(world, tiny_worlds, tmp_path, capsys):
    from pie_lib.cli import main
    from pie_lib.prune.sweep import run_prune

    run_prune(_cfg(world, tmp_path / "prune", n=2), model=world.model, clt=world.clt)
    sel = tmp_path / "prune" / "selections.jsonl"
    other = tiny_worlds["gpt2"]
    before = _files(tmp_path)
    rc = main(["interpret", "--selections", str(sel), "--model", str(other.model_dir), "--clt", str(other.clt_dir),
               "--device", "cpu", "--out", str(tmp_path / "interp"), "--no-progress"])  # fmt: skip
    _one_error_line(capsys, rc, "interpret", r"selections\.jsonl were made with model .*; pass --model")
    rc = main(["interpret", "--selections", str(sel), "--model", str(world.model_dir), "--clt", str(other.clt_dir),
               "--device", "cpu", "--out", str(tmp_path / "interp"), "--no-progress"])  # fmt: skip
    assert rc == 2 and "CLT" in capsys.readouterr().err  # the gpt2 CLT does not even fit the llama model
    assert _files(tmp_path) == before  # no output folder left behind
    (tmp_path / "bad.jsonl").write_bytes(b'{"occurrences": [[0, 1, 2]]}\n\xff\xfe\n')
    rc = main(["interpret", "--selections", str(tmp_path / "bad.jsonl"), "--out", str(tmp_path / "i2")])
    _one_error_line(capsys, rc, "interpret", r"bad\.jsonl:2: corrupt line \(not UTF-8 text\)")
    (tmp_path / "bad.jsonl").write_text('{"occurrences": [[0, "1", 2]]}\n')
    rc = main(["interpret", "--selections", str(tmp_path / "bad.jsonl"), "--out", str(tmp_path / "i2")])
    _one_error_line(capsys, rc, "interpret", r"row 1: expected .*non-negative integers")
    assert not (tmp_path / "i2").exists()


def test_interpret_folder_has_one_writer(tmp_path, capsys):
    from pie_lib.cli import main

    out = tmp_path / "interp"
    out.mkdir()
    with folder_lock(out, what="pie interpret"):
        rc = main(["interpret", "--features", "0:1", "--out", str(out), "--no-progress"])
    _one_error_line(capsys, rc, "interpret", rf"being written by another run .*PID {os.getpid()}")
