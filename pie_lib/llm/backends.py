"""Build the chat backend an :class:`~pie_lib.llm.config.LLMConfig` asks for."""

from __future__ import annotations

from pathlib import Path

from pie_lib.llm.base import ChatBackend
from pie_lib.llm.cache import CachedChat, DiskCache
from pie_lib.llm.config import LLMConfig


def make_chat(cfg: LLMConfig | None = None) -> ChatBackend:
    """The backend of ``cfg`` (default: offline), wrapped in the disk cache when ``cfg.cache_dir``.

    The offline heuristic is never cached (it is instant and deterministic).
    """
    cfg = (cfg or LLMConfig()).resolved()
    if cfg.backend == "offline":
        from pie_lib.interpret.heuristics import OfflineChat

        return OfflineChat()
    if cfg.backend == "openai":
        from pie_lib.llm.openai_backend import OpenAIChat

        chat: ChatBackend = OpenAIChat(cfg)
    else:
        from pie_lib.llm.hf_backend import HFChat

        chat = HFChat(cfg)
    if cfg.cache_dir:
        chat = CachedChat(chat, DiskCache(Path(cfg.cache_dir)))
    return chat
