"""Build the LLM chat backend (openai / hf) an :class:`~pie_lib.llm.config.LLMConfig` asks for.

The offline heuristic answers the interpret prompts, so it belongs to the interpret stage:
:func:`pie_lib.interpret.chat.make_chat` builds every backend, offline included.
"""

from __future__ import annotations

from pathlib import Path

from pie_lib.errors import LLMConfigError
from pie_lib.llm.base import ChatBackend
from pie_lib.llm.cache import CachedChat, DiskCache
from pie_lib.llm.config import LLMConfig


def make_chat(cfg: LLMConfig | None = None) -> ChatBackend:
    """The LLM backend of ``cfg``, wrapped in the disk cache when ``cfg.cache_dir``."""
    cfg = (cfg or LLMConfig()).resolved()
    if cfg.backend == "offline":
        raise LLMConfigError(
            "the offline backend is the interpret stage's heuristic, not an LLM; build it with "
            "pie_lib.interpret.chat.make_chat"
        )
    if cfg.backend == "openai":
        from pie_lib.llm.openai_backend import OpenAIChat

        chat: ChatBackend = OpenAIChat(cfg)
    else:
        from pie_lib.llm.hf_backend import HFChat

        chat = HFChat(cfg)
    if cfg.cache_dir:
        chat = CachedChat(chat, DiskCache(Path(cfg.cache_dir)))
    return chat
