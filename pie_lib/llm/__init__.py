"""LLM access for pie_lib: one chat interface, three backends, a disk cache, retries.

- :class:`LLMConfig` -- which backend (offline / openai / hf), model, server, key (from env vars
  ``PIE_LLM_*`` or ``OPENAI_*``), timeouts, retries, cache folder.
- :func:`make_chat` -- the :class:`ChatBackend` for a config.
- :class:`Usage` -- calls and token counts, summed into per-feature costs.
"""

from pie_lib.llm.backends import make_chat
from pie_lib.llm.base import BACKENDS, Backend, ChatBackend, ChatResponse, Message, Usage, redact
from pie_lib.llm.cache import CachedChat, DiskCache, cache_key
from pie_lib.llm.config import LLMConfig
from pie_lib.llm.retry import RetryPolicy

__all__ = [
    "BACKENDS",
    "Backend",
    "CachedChat",
    "ChatBackend",
    "ChatResponse",
    "DiskCache",
    "LLMConfig",
    "Message",
    "RetryPolicy",
    "Usage",
    "cache_key",
    "make_chat",
    "redact",
]
