"""The chat backend of an LLM config, offline heuristic included.

The offline heuristic (:mod:`pie_lib.interpret.heuristics`) answers this stage's own prompts, so
it is built here; the LLM backends come from :func:`pie_lib.llm.make_chat`. The offline
heuristic is never cached (it is instant and deterministic).
"""

from __future__ import annotations

from pie_lib.interpret.heuristics import OfflineChat
from pie_lib.llm import ChatBackend, LLMConfig
from pie_lib.llm import make_chat as make_llm_chat


def make_chat(cfg: LLMConfig | None = None) -> ChatBackend:
    """The backend of ``cfg`` (default: offline), wrapped in the disk cache when ``cfg.cache_dir``."""
    cfg = (cfg or LLMConfig()).resolved()
    if cfg.backend == "offline":
        return OfflineChat()
    return make_llm_chat(cfg)
