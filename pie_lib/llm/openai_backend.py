"""Any OpenAI-compatible chat-completions server (OpenAI, vLLM, Ollama, llama.cpp server).

Retries are ours (the client's own are turned off) so that every transient failure -- 429,
5xx, timeouts, dropped connections -- is backed off the same way and logged without secrets.
Every message this module logs or raises passes through :func:`~pie_lib.llm.base.redact`.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, cast

from pie_lib.errors import LLMRequestError, MissingDependencyError
from pie_lib.llm.base import ChatResponse, Message, redact
from pie_lib.llm.config import LLMConfig
from pie_lib.llm.retry import TransientError, with_retries

if TYPE_CHECKING:
    from openai.types.chat import ChatCompletionMessageParam

log = logging.getLogger("pie_lib.llm")


class OpenAIChat:
    """Chat completions through the ``openai`` client against ``cfg.base_url``.

    Args:
        cfg: a resolved :class:`LLMConfig` with backend "openai".
    """

    kind = "openai"

    def __init__(self, cfg: LLMConfig) -> None:
        try:
            import openai
        except ImportError:  # pragma: no cover - openai is a declared extra
            raise MissingDependencyError("the openai backend needs the openai package: pip install openai") from None
        self._openai = openai
        self.cfg = cfg
        self.model = str(cfg.model)
        self._secrets = [cfg.api_key]
        self.client = openai.OpenAI(api_key=cfg.api_key, base_url=cfg.base_url, timeout=cfg.timeout_s, max_retries=0)

    def _clean(self, text: str) -> str:
        return redact(text, self._secrets)

    def _once(self, messages: list[Message], params: dict[str, Any]) -> ChatResponse:
        oa = self._openai
        try:
            # our messages are {"role", "content"} dicts: the client's message params
            sent = cast("list[ChatCompletionMessageParam]", messages)
            r = self.client.chat.completions.create(model=self.model, messages=sent, **params)
        except oa.APITimeoutError:
            raise TransientError(f"timed out after {self.cfg.timeout_s:g}s") from None
        except oa.APIConnectionError as exc:
            raise TransientError(self._clean(f"connection error ({type(exc).__name__})")) from None
        except oa.APIStatusError as exc:
            status = exc.status_code
            msg = self._clean(f"HTTP {status}: {str(exc)[:300]}")
            if status == 429 or status >= 500 or status == 408:
                retry_after = None
                try:
                    header = exc.response.headers.get("retry-after")
                    retry_after = float(header) if header is not None else None
                except (TypeError, ValueError, AttributeError):
                    pass
                raise TransientError(msg, retry_after) from None
            raise LLMRequestError(
                f"LLM request to model {self.model!r} was refused ({msg}); check the model name, "
                "the API key and the base URL"
            ) from None
        try:
            text = r.choices[0].message.content or ""
        except (AttributeError, IndexError, TypeError):
            text = ""  # a malformed body counts as an unparseable answer, not a crash
        usage = getattr(r, "usage", None)
        return ChatResponse(
            text=self._clean(text),  # a misbehaving server might echo the key back
            prompt_tokens=int(getattr(usage, "prompt_tokens", 0) or 0),
            completion_tokens=int(getattr(usage, "completion_tokens", 0) or 0),
        )

    def complete(
        self, messages: list[Message], *, temperature: float, max_tokens: int, seed: int | None = None
    ) -> ChatResponse:
        params: dict[str, Any] = {"temperature": temperature, "max_tokens": max_tokens}
        if seed is not None:
            params["seed"] = seed
        try:
            return with_retries(lambda: self._once(messages, params), self.cfg.retry, f"LLM request ({self.model})")
        except TransientError as exc:
            raise LLMRequestError(
                f"LLM request to model {self.model!r} failed after {self.cfg.retry.max_retries} retries "
                f"({self._clean(str(exc))}); the server may be overloaded or down -- rerun later, finished work is kept"
            ) from None
