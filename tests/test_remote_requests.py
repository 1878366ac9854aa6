"""What nnsight's ``remote="local"`` simulation misses, checked in CI without a server.

Each engine trace runs on a *remote* model (a meta skeleton here, as in a real ``--remote`` run);
nnsight's own client serialises the request (``RemoteBackend._serialize``) and loads the answer
(``RemoteBackend.finalize`` + its push into the caller's frame); only the transport is replaced:
the payload goes to ``tests/remote_worker.py``, a separate process that cannot import pie_lib and
executes it the way the NDIF actor does. The saves that come back must equal a local run.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import nnsight.modeling.huggingface as nnsight_hf
import pytest
import torch
from nnsight.intervention.backends.remote import RemoteBackend, RemoteError

from pie_lib.engine import remote as remote_
from pie_lib.engine.traces import (
    mlp_out_gradients,
    patched_last_logits,
    patched_last_logits_many,
    run_with_cache,
    spliced_last_logits,
)
from pie_lib.errors import SettingError
from pie_lib.models.loading import load_model

WORKER = Path(__file__).with_name("remote_worker.py")


class Worker:
    """One server process; ``call`` sends one request and returns the raw result blob."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-I", str(WORKER)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
        )
        self.requests = 0

    def call(self, model_key: str, compress: bool, blob: bytes) -> bytes:
        header = json.dumps({"model_key": model_key, "compress": compress}).encode()
        self.proc.stdin.write(struct.pack(">I", len(header)) + header + struct.pack(">I", len(blob)) + blob)
        self.proc.stdin.flush()
        status = self.proc.stdout.read(1)
        if not status:
            raise RuntimeError("the worker process died")
        n = struct.unpack(">I", self.proc.stdout.read(4))[0]
        data = self.proc.stdout.read(n)
        self.requests += 1
        if status[0] != 0:
            raise RemoteError(data.decode())
        return data

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server():
    worker = Worker()

    def request(self, request, tracer):  # RemoteBackend.request with the network replaced
        return self.finalize(worker.call(request.model_key, request.compress, self._serialize(tracer)))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(RemoteBackend, "request", request)
        yield worker
    worker.close()


def _remote(world):
    folder = str(world.model_dir)
    nnsight_hf._ID_CACHE[folder] = folder  # offline: no Hub to canonicalise a local id (test harness only)
    return load_model(folder, remote=True)


def _ids(world, n=3):
    texts = [p.text_clean for p in world.pairs if len(p.text_clean.split()) == 6][:n]
    return torch.tensor(world.model.tokenize(texts))


ARCHS = ["llama", "gemma2", "gpt2"]


@pytest.mark.parametrize("arch", ARCHS)
def test_engine_traces_through_a_server_without_pie_lib(tiny_worlds, server, one_torch_thread, arch):
    w = tiny_worlds[arch]
    rem, loc = _remote(w), w.model
    assert rem.device == torch.device("cpu") and next(rem.hf.parameters()).device.type == "meta"
    ids = _ids(w)
    before = server.requests
    a, b = run_with_cache(rem, ids), run_with_cache(loc, ids)
    for x, y in ((a.resid_mid, b.resid_mid), (a.mlp_out, b.mlp_out), (a.last_logits, b.last_logits)):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-6)
    c, wr = torch.tensor([5, 6, 7]), torch.tensor([8, 9, 10])
    for mode in ("replacement", "full", "relp"):
        for metric in ("logit_diff", "logsumexp"):
            g1, m1 = mlp_out_gradients(rem, ids, c, wr, metric, mode)
            g2, m2 = mlp_out_gradients(loc, ids, c, wr, metric, mode)
            assert g1.abs().sum() > 0, (mode, metric)
            torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(m1, m2, rtol=1e-6, atol=1e-6)
    off = torch.randn_like(b.mlp_out) * 0.05
    for lse in (False, True):
        r, l = patched_last_logits(rem, ids, off, lse), patched_last_logits(loc, ids, off, lse)
        torch.testing.assert_close(r[0], l[0], rtol=0, atol=1e-6)
        if lse:
            torch.testing.assert_close(r[1], l[1], rtol=0, atol=1e-5)
    assert server.requests - before == 1 + 6 + 2  # every trace above went through the worker


def test_patch_chunks_go_as_one_session(tiny_worlds, server, one_torch_thread):
    w = tiny_worlds["gpt2"]
    rem, loc = _remote(w), w.model
    ids = _ids(w)
    off = torch.randn(loc.n_layers, ids.shape[0], ids.shape[1], loc.d_model) * 0.05
    jobs = [(ids, off), (ids[:1], off[:, :1]), (ids, -off), (ids[1:], 2 * off[:, 1:])]
    before, counted = server.requests, remote_.request_count()
    got = patched_last_logits_many(rem, jobs, with_logsumexp=True)
    assert server.requests - before == 1 and remote_.request_count() - counted == 1
    want = patched_last_logits_many(loc, jobs, with_logsumexp=True)
    assert len(got) == len(want) == 4
    for (a, b), (c, d) in zip(got, want):
        torch.testing.assert_close(a, c, rtol=0, atol=1e-6)
        torch.testing.assert_close(b, d, rtol=0, atol=1e-5)
    # a byte cap splits the jobs into more sessions, never changes the values
    split = patched_last_logits_many(rem, jobs, with_logsumexp=True, max_request_bytes=off.numel() * 4)
    assert server.requests - before == 1 + 4
    for (a, _), (c, _) in zip(split, want):
        torch.testing.assert_close(a, c, rtol=0, atol=1e-6)


def test_server_precision_probe(tiny_worlds, server):
    rem = _remote(tiny_worlds["gpt2"])
    assert remote_.server_dtype(rem) == torch.float32  # the worker deploys float32, like ndif-local.sh
    n = server.requests
    assert remote_.server_dtype(rem) == torch.float32 and server.requests == n  # asked once per model


def test_the_worker_is_as_strict_as_the_server(tiny_worlds, server):
    """The two failures the simulation lets through fail here: a pie_lib object read in the block,
    and a list created outside the block."""
    rem = _remote(tiny_worlds["gpt2"])
    ids = _ids(tiny_worlds["gpt2"])
    lm, arch = rem.lm, rem.arch
    with pytest.raises(RemoteError, match="pie_lib"):
        with remote_.trace(rem, ids):
            x = lm.transformer.h[0].mlp.output.save()  # noqa: F841 (the trace body is what is sent)
            name = arch.name  # noqa: F841 (a pie_lib dataclass: pickled by reference)
    outside = []
    with remote_.trace(rem, ids):
        outside.append(lm.transformer.h[0].mlp.output.save())
        inside = lm.transformer.h[0].mlp.output.save()
    assert outside == []  # the server appended to its own copy; nothing came back
    assert inside.shape[:2] == ids.shape  # while a name bound in the block does


def test_splice_refuses_remote(tiny_worlds):
    rem = _remote(tiny_worlds["gpt2"])
    with pytest.raises(SettingError, match="local-only"):
        spliced_last_logits(rem, tiny_worlds["gpt2"].clt, _ids(tiny_worlds["gpt2"]), torch.zeros(1))


def test_prune_through_the_worker_equals_local(tiny_worlds, server, one_torch_thread, tmp_path):
    """A whole FAP + FAP-Synergy sweep on the remote skeleton: same selections, same KLs, and a
    handful of requests per batch instead of one per patch chunk."""
    from pie_lib.prune.sweep import PruneConfig, load_selections, run_prune

    w = tiny_worlds["gpt2"]
    common = dict(
        model=str(w.model_dir),
        clt=str(w.clt_dir),
        data=str(w.pairs_path),
        n=4,
        methods=["fap", "fap-synergy"],
        k=[2, 4],
        seeds=[0],
        progress=False,
        batch_size=4,
    )
    local = run_prune(PruneConfig(out=str(tmp_path / "local"), **common), model=w.model, clt=w.clt)
    before = server.requests
    rem = run_prune(PruneConfig(out=str(tmp_path / "remote"), remote=True, **common), model=_remote(w), clt=w.clt)
    n_requests = server.requests - before
    cols = ["method", "k", "seed", "prompt_idx", "n_active", "n_kept"]
    assert rem[cols].equals(local[cols])
    assert (rem["kl"] - local["kl"]).abs().max() <= 1e-5

    def key(r):
        return (r["method"], r["k"], r["prompt_idx"])

    assert sorted(map(lambda r: (key(r), r["occurrences"]), load_selections(tmp_path / "remote"))) == sorted(
        map(lambda r: (key(r), r["occurrences"]), load_selections(tmp_path / "local"))
    )
    n_batches = len({(len(p.text_clean.split())) for p in w.pairs[:4]})  # one batch per token length
    print(f"remote prune: {n_requests} requests for {n_batches} batch(es)", remote_.request_summary())
    assert 0 < n_requests <= 8 * n_batches, n_requests  # caches, gradient, a few patch sessions per batch


def test_steered_generation_is_one_request(tiny_worlds, server, one_torch_thread):
    from pie_lib.engine.generation import steered_greedy

    w = tiny_worlds["llama"]
    rem, loc = _remote(w), w.model
    ids = _ids(w, 2)
    off = torch.randn(loc.n_layers, 2, 1, loc.d_model) * 0.5
    jobs = [(ids, off), (ids[:1], -off[:, :1])]
    want = steered_greedy(loc, jobs, 4)
    before = server.requests
    got = steered_greedy(rem, jobs, 4)
    assert server.requests - before == 1
    assert [g.shape for g in got] == [(2, 4), (1, 4)]
    for g, x in zip(got, want):
        assert torch.equal(g, x)
    # the model's own decoding loop equals one full forward per step with the same offsets
    cur = ids
    for _ in range(4):
        logits, _ = patched_last_logits(loc, cur, -off.expand(-1, -1, cur.shape[1], -1))
        cur = torch.cat([cur, logits.argmax(-1, keepdim=True)], 1)
    assert torch.equal(cur[:, ids.shape[1] :], want[0])


def test_synergy_float32_is_refused_on_a_bfloat16_server(tiny_worlds):
    """The skeleton's meta weights are float32 whatever the server runs: the server's dtype decides."""
    from pie_lib.engine.precision import float32_weights, runs_in_float32

    rem = _remote(tiny_worlds["gpt2"])
    rem.extra["server_dtype"] = torch.bfloat16  # what a default NDIF deployment reports
    assert not runs_in_float32(rem)
    with pytest.raises(SettingError, match="bfloat16.*--synergy-precision model"):
        with float32_weights(rem):
            pass
    rem.extra["server_dtype"] = torch.float32
    assert runs_in_float32(rem)


def test_remote_sweep_checks_the_server_precision_first(tiny_worlds, tmp_path):
    from pie_lib.prune.sweep import PruneConfig, run_prune

    w = tiny_worlds["gpt2"]
    rem = _remote(w)
    rem.extra["server_dtype"] = torch.bfloat16  # no request: the probe's answer is cached
    cfg = dict(
        model=str(w.model_dir), clt=str(w.clt_dir), data=str(w.pairs_path), n=2, k=[2], seeds=[0], progress=False
    )
    with pytest.raises(SettingError, match="runs in bfloat16.*--synergy-precision model"):
        run_prune(
            PruneConfig(out=str(tmp_path / "a"), methods=["fap-synergy"], remote=True, **cfg), model=rem, clt=w.clt
        )
    with pytest.raises(SettingError, match="--dtype float32: the NDIF deployment .* runs in bfloat16"):
        run_prune(
            PruneConfig(out=str(tmp_path / "b"), methods=["fap"], dtype="float32", remote=True, **cfg),
            model=rem,
            clt=w.clt,
        )
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # refused before anything is written


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_graph_traces_through_a_server_without_pie_lib(tiny_worlds, server, one_torch_thread, arch):
    from pie_lib.engine.graph import GraphTargets, prompt_writes, replacement_target_gradients

    w = tiny_worlds[arch]
    rem, loc = _remote(w), w.model
    ids = _ids(w, 1)[0]
    a, b = prompt_writes(rem, ids), prompt_writes(loc, ids)
    for x, y in (
        (a.embed, b.embed),
        (a.resid_mid, b.resid_mid),
        (a.mlp_out, b.mlp_out),
        (a.last_logits, b.last_logits),
    ):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-6)
    g = torch.Generator().manual_seed(0)
    for layer in ([1, 2, -1], [1, 1]):  # with a logit target, and features only (fewer upstream layers)
        n = len(layer)
        t = GraphTargets(
            layer=torch.tensor(layer),
            pos=torch.tensor([2, 3, 0][:n]),
            enc=torch.randn(n, loc.d_model, generator=g),
            bias=torch.zeros(n),
            token=torch.tensor([-1, -1, 5][:n]),
        )
        r, l = replacement_target_gradients(rem, ids, t), replacement_target_gradients(loc, ids, t)
        assert r.mlp.shape == l.mlp.shape == (loc.n_layers, n, ids.numel(), loc.d_model) and l.mlp.abs().sum() > 0
        torch.testing.assert_close(r.mlp, l.mlp, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(r.embed, l.embed, rtol=1e-5, atol=1e-7)
