"""Test helpers: a real OpenAI-compatible chat-completions server on loopback, and a tiny world.

:class:`FakeLLMServer` is an ``http.server`` on 127.0.0.1 (ephemeral port) in a background
thread. ``POST /v1/chat/completions`` is answered according to ``behaviours``, a list consumed
one request at a time (the last entry repeats):

- ``"ok"``: a well-formed answer from ``responder(messages)`` (default: the offline heuristic, so
  answers parse like an LLM's would);
- ``"malformed"``: a 200 answer with no ``[EXPLANATION]:`` / no JSON;
- ``"429"`` / ``"500"``: that status with an error body (which echoes the Authorization header,
  as a careless proxy might: the client must never let it through);
- ``"slow"``: a correct answer after ``slow_s`` seconds (past the client's timeout);
- ``"echo_key"``: a 200 answer whose content contains the Authorization header.

Requests are counted server-side (``n_requests``) and kept (``requests``).

:func:`build_tiny_world` writes a random 3-layer Llama with the toy world's tokenizer and a
random JumpReLU CLT whose thresholds are calibrated so that features fire on ~10% of tokens.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable


def _offline_answer(messages: list[dict]) -> str:
    from pie_lib.interpret.heuristics import OfflineChat

    return OfflineChat().complete(messages).text


class FakeLLMServer:
    def __init__(
        self,
        behaviours: list[str] | None = None,
        responder: Callable[[list[dict]], str] | None = None,
        slow_s: float = 1.5,
    ) -> None:
        self.behaviours = list(behaviours or ["ok"])
        self.responder = responder or _offline_answer
        self.slow_s = slow_s
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None

    @property
    def n_requests(self) -> int:
        return len(self.requests)

    @property
    def base_url(self) -> str:
        assert self._httpd is not None
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def set(self, behaviours: list[str]) -> None:
        with self.lock:
            self.behaviours = list(behaviours)

    def _next(self) -> str:
        with self.lock:
            return self.behaviours.pop(0) if len(self.behaviours) > 1 else self.behaviours[0]

    def __enter__(self) -> "FakeLLMServer":
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # keep test output quiet
                pass

            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                auth = self.headers.get("Authorization", "")
                with server.lock:
                    server.requests.append({"path": self.path, "body": body, "auth": auth})
                mode = server._next()
                if mode in ("429", "500"):
                    payload = {"error": {"message": f"server says no (you sent {auth})", "type": "error", "code": mode}}
                    return self._send(int(mode), payload)
                if mode == "slow":
                    time.sleep(server.slow_s)
                if mode == "malformed":
                    content = "I think these tokens are interesting but I will not say more."
                elif mode == "echo_key":
                    content = f"[EXPLANATION]: your header was {auth}"
                else:
                    content = server.responder(body.get("messages", []))
                self._send(
                    200,
                    {
                        "id": "chatcmpl-test",
                        "object": "chat.completion",
                        "created": int(time.time()),
                        "model": body.get("model", "fake"),
                        "choices": [
                            {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
                        ],
                        "usage": {"prompt_tokens": 100, "completion_tokens": 10, "total_tokens": 110},
                    },
                )

            def _send(self, status: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    if status == 429:
                        self.send_header("Retry-After", "0")
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._httpd is not None
        self._httpd.shutdown()
        self._httpd.server_close()


def build_tiny_world(folder: str | Path, n_features: int = 48, seed: int = 0) -> tuple[Path, Path]:
    """A random Llama (toy tokenizer) and a calibrated random JumpReLU CLT under ``folder``.

    Returns:
        (model folder, CLT folder).
    """
    import torch

    from pie_lib.clt import save_clt
    from pie_lib.engine.traces import run_with_cache
    from pie_lib.models.loading import load_model
    from pie_lib.models.random_init import random_model
    from pie_lib.toy.corpus import vocabulary_texts
    from pie_lib.toy.tokenizer import build_tokenizer

    folder = Path(folder)
    mpath, cpath = folder / "model", folder / "clt"
    if (cpath / "config.yaml").exists():
        return mpath, cpath
    tok = build_tokenizer(vocabulary_texts())
    model = random_model("llama", vocab_size=len(tok), seed=seed)
    model.save_pretrained(mpath)
    tok.save_pretrained(str(mpath))
    L, D = model.config.num_hidden_layers, model.config.hidden_size
    lm = load_model(mpath, device="cpu")
    ids = torch.tensor([tok("When Mary and John went to the store , John gave a drink to Mary .")["input_ids"]])
    resid = run_with_cache(lm, ids).resid_mid[:, 0, 1:]  # [L, T, D]
    g = torch.Generator().manual_seed(seed)
    W_enc = torch.randn(L, n_features, D, generator=g)
    W_enc = W_enc / W_enc.norm(dim=-1, keepdim=True) / resid.norm(dim=-1).mean(dim=1)[:, None, None]
    pre = torch.einsum("ltd,lfd->ltf", resid, W_enc)
    thr = torch.quantile(pre.flatten(1), 0.9, dim=1)[:, None].expand(L, n_features).contiguous()
    W_dec = [torch.randn(n_features, L - i, D, generator=g) * 0.05 for i in range(L)]
    save_clt(cpath, W_enc, torch.zeros(L, n_features), W_dec, torch.zeros(L, D), threshold=thr)
    return mpath, cpath
