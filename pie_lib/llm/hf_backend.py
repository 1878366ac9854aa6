"""A local Hugging Face causal LM as chat backend (``transformers``, no server).

Uses the tokenizer's chat template when it has one, otherwise a plain "System/User/Assistant"
transcript. Greedy at temperature 0, sampling otherwise (seeded per request, so answers are
reproducible and cacheable). Token counts are the real prompt / generated token counts.
"""

from __future__ import annotations

import threading
from typing import Any

import torch

from pie_lib.errors import WeightsUnavailableError
from pie_lib.llm.base import ChatResponse, Message
from pie_lib.llm.config import LLMConfig


class HFChat:
    """Chat with a local causal LM.

    Args:
        cfg: a resolved :class:`LLMConfig` with backend "hf" (``model`` = folder or hub id).
    """

    kind = "hf"

    def __init__(self, cfg: LLMConfig) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model = str(cfg.model)
        device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = getattr(torch, cfg.dtype) if cfg.dtype else (torch.float32 if device == "cpu" else torch.bfloat16)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.model)
            # transformers' stub leaves .to unbound on from_pretrained's result (it takes "self" as device)
            self.lm = AutoModelForCausalLM.from_pretrained(self.model, dtype=dtype).to(device).eval()  # pyright: ignore[reportArgumentType]
        except (OSError, ValueError) as exc:
            raise WeightsUnavailableError(
                f"hf explainer model {self.model!r} could not be loaded ({type(exc).__name__}); "
                "pass a local folder with weights and tokenizer, or run where the hub is reachable"
            ) from None
        self.device = torch.device(device)
        self._lock = threading.Lock()  # one generate at a time on one model

    def _prompt_ids(self, messages: list[Message]) -> torch.Tensor:
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=False)
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
            return torch.as_tensor(ids).reshape(1, -1)
        text = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages) + "Assistant:"
        return torch.tensor([tok(text)["input_ids"]])

    def complete(
        self, messages: list[Message], *, temperature: float, max_tokens: int, seed: int | None = None
    ) -> ChatResponse:
        ids = self._prompt_ids(messages).to(self.device)
        kw: dict[str, Any] = {"max_new_tokens": max_tokens, "do_sample": temperature > 0}
        if temperature > 0:
            kw["temperature"] = temperature
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        with self._lock, torch.no_grad():
            if temperature > 0:
                torch.manual_seed(0 if seed is None else int(seed))
            # transformers' stub: generate cannot bind to from_pretrained's declared result type
            out = self.lm.generate(ids, attention_mask=torch.ones_like(ids), pad_token_id=pad, **kw)  # pyright: ignore[reportAttributeAccessIssue]
        new = out[0, ids.shape[1] :]
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        return ChatResponse(text=text, prompt_tokens=int(ids.shape[1]), completion_tokens=int(new.shape[0]))
