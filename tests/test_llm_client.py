"""The OpenAI-compatible backend against a real HTTP server on loopback; cache; retries; secrets."""

from __future__ import annotations

import logging
import traceback
from pathlib import Path

import numpy as np
import pytest
from fake_llm_server import FakeLLMServer

from pie_lib.errors import LLMConfigError, LLMRequestError
from pie_lib.interpret.examples import Example, FeatureExamples
from pie_lib.interpret.explainers import ChatExplainer, ExplainConfig
from pie_lib.llm import DiskCache, LLMConfig, RetryPolicy, make_chat
from pie_lib.llm.retry import TransientError, with_retries

SECRET = "sk-test-SECRET"
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]


def _cfg(server: FakeLLMServer, tmp: Path | None, **kw) -> LLMConfig:
    retry = kw.pop("retry", RetryPolicy(max_retries=2, base_delay_s=0.01, max_delay_s=0.05))
    return LLMConfig(
        backend="openai",
        model="fake-model",
        base_url=server.base_url,
        api_key=SECRET,
        timeout_s=kw.pop("timeout_s", 5.0),
        retry=retry,
        cache_dir=tmp,
        **kw,
    )


def _fx() -> FeatureExamples:
    text = "When Mary went to the store , John gave a drink to Mary ."
    words = text.split(" ")
    starts, pos = [], 0
    for w in words:
        starts.append(pos)
        pos += len(w) + 1
    ends = [s + len(w) for s, w in zip(starts, words)]
    acts = np.zeros(len(words) + 1, dtype=np.float32)
    acts[1 + words.index("Mary")] = 2.0
    acts[-2] = 3.0
    ex = Example(0, "top", 3.0, text, [0, *starts], [0, *ends], acts)
    return FeatureExamples(0, 1, 3.0, 5, 100, [ex])


@pytest.fixture(autouse=True)
def _debug_logs(caplog):
    caplog.set_level(logging.DEBUG)  # every library logs at full detail: the key must still not appear
    yield
    assert SECRET not in caplog.text


def test_normal_answer_and_usage(tmp_path):
    with FakeLLMServer(["ok"]) as srv:
        e = ChatExplainer(make_chat(_cfg(srv, None))).explain(_fx())
        assert e.status == "ok" and e.description and "Mary" in e.description
        assert (e.usage.calls, e.usage.prompt_tokens, e.usage.completion_tokens) == (1, 100, 10)
        assert srv.requests[0]["auth"] == f"Bearer {SECRET}"  # the key does reach the server
        body = srv.requests[0]["body"]
        assert body["temperature"] == 0.2 and body["model"] == "fake-model"
        assert "<<" in body["messages"][1]["content"] and "[EXPLANATION]" in body["messages"][0]["content"]


def test_cache_prevents_second_request(tmp_path):
    with FakeLLMServer(["ok"]) as srv:
        chat = make_chat(_cfg(srv, tmp_path / "cache"))
        a = chat.complete(MESSAGES, temperature=0.2, max_tokens=50)
        b = chat.complete(MESSAGES, temperature=0.2, max_tokens=50)
        assert srv.n_requests == 1
        assert not a.cached and b.cached and a.text == b.text
        assert (b.prompt_tokens, b.completion_tokens) == (100, 10)  # the cost of the request that filled it
        chat.complete(MESSAGES, temperature=0.2, max_tokens=50, seed=1)  # another sample: a new request
        assert srv.n_requests == 2
    assert len(DiskCache(tmp_path / "cache")) == 2
    for f in (tmp_path / "cache").rglob("*"):
        if f.is_file():
            assert SECRET not in f.read_text()


def test_malformed_answers_are_retried_then_counted(tmp_path):
    with FakeLLMServer(["malformed"]) as srv:
        e = ChatExplainer(make_chat(_cfg(srv, tmp_path)), ExplainConfig(parse_retries=2)).explain(_fx())
        assert e.status == "parse_failed" and e.description is None
        assert e.parse_failures == 3 and srv.n_requests == 3 and e.usage.calls == 3
    with FakeLLMServer(["malformed", "ok"]) as srv:
        e = ChatExplainer(make_chat(_cfg(srv, None))).explain(_fx())
        assert e.status == "ok" and e.parse_failures == 1 and srv.n_requests == 2


def test_429_then_success(tmp_path):
    with FakeLLMServer(["429", "429", "ok"]) as srv:
        r = make_chat(_cfg(srv, None)).complete(MESSAGES, temperature=0.0, max_tokens=10)
        assert srv.n_requests == 3 and r.text


def test_500_exhausts_retries_without_leaking_the_key(tmp_path):
    with FakeLLMServer(["500"]) as srv:  # the error body echoes the Authorization header
        with pytest.raises(LLMRequestError) as info:
            make_chat(_cfg(srv, tmp_path)).complete(MESSAGES, temperature=0.0, max_tokens=10)
        assert srv.n_requests == 3  # 1 + 2 retries
        assert SECRET not in str(info.value) and "500" in str(info.value)
        assert SECRET not in "".join(traceback.format_exception(info.value))  # chained causes included
    assert len(DiskCache(tmp_path)) == 0  # failures are not cached


def test_slow_answer_times_out_then_retries(tmp_path):
    with FakeLLMServer(["slow"], slow_s=1.0) as srv:
        with pytest.raises(LLMRequestError, match="timed out"):
            make_chat(_cfg(srv, None, timeout_s=0.2, retry=RetryPolicy(1, 0.01, 0.02))).complete(
                MESSAGES, temperature=0.0, max_tokens=10
            )
        assert srv.n_requests == 2
    with FakeLLMServer(["slow", "ok"], slow_s=1.0) as srv:
        r = make_chat(_cfg(srv, None, timeout_s=0.2)).complete(MESSAGES, temperature=0.0, max_tokens=10)
        assert r.text and srv.n_requests == 2


def test_echoed_key_is_redacted(tmp_path):
    with FakeLLMServer(["echo_key"]) as srv:
        chat = make_chat(_cfg(srv, tmp_path))
        r = chat.complete(MESSAGES, temperature=0.0, max_tokens=10)
        assert SECRET not in r.text and "<redacted>" in r.text
    assert all(SECRET not in f.read_text() for f in tmp_path.rglob("*.json"))


def test_config_from_env_never_shows_the_key(monkeypatch):
    monkeypatch.setenv("PIE_LLM_API_KEY", SECRET)
    monkeypatch.setenv("PIE_LLM_BASE_URL", "http://127.0.0.1:9/v1")
    monkeypatch.setenv("PIE_LLM_MODEL", "m")
    c = LLMConfig(backend="openai").resolved()
    assert c.api_key == SECRET and c.base_url.endswith("/v1") and c.model == "m"
    assert SECRET not in repr(c) and SECRET not in str(c.public())
    monkeypatch.delenv("PIE_LLM_API_KEY")
    monkeypatch.delenv("PIE_LLM_BASE_URL")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(LLMConfigError, match="PIE_LLM_API_KEY"):
        LLMConfig(backend="openai").resolved()
    with pytest.raises(LLMConfigError, match="unknown LLM backend"):
        LLMConfig(backend="claude").resolved()  # type: ignore[arg-type]


def test_with_retries_backoff_schedule():
    waits: list[float] = []
    calls = iter([TransientError("a"), TransientError("b", retry_after=0.5), "done"])

    def fn():
        v = next(calls)
        if isinstance(v, Exception):
            raise v
        return v

    pol = RetryPolicy(max_retries=3, base_delay_s=1.0, max_delay_s=10.0, jitter=0.0)
    assert with_retries(fn, pol, "t", sleep=waits.append) == "done"
    assert waits == [1.0, 0.5]  # exponential first, then the server's Retry-After
    assert [pol.delay(i) for i in range(6)] == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
