"""Randomly initialised models of each supported architecture (tests, benchmarks at real shapes).

Weights here are random: these models know nothing. They exist to check hook placement,
shapes and speed without downloading anything.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel

SMALL = {
    "llama": dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    ),
    "gemma2": dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=128,
        sliding_window=16,
        query_pre_attn_scalar=8,
    ),
    "gpt2": dict(n_embd=32, n_layer=3, n_head=4, n_positions=128),
}

#: Published shapes (from the models' config.json files) for real-scale benchmarks.
REAL_SHAPES = {
    "llama-3.2-1b": (
        "llama",
        dict(
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=64,
            vocab_size=128256,
            max_position_embeddings=2048,
            rope_theta=500000.0,
            tie_word_embeddings=True,
        ),
    ),
    "gemma-2-2b": (
        "gemma2",
        dict(
            hidden_size=2304,
            intermediate_size=9216,
            num_hidden_layers=26,
            num_attention_heads=8,
            num_key_value_heads=4,
            head_dim=256,
            vocab_size=256000,
            max_position_embeddings=2048,
            sliding_window=4096,
            query_pre_attn_scalar=256,
            final_logit_softcapping=30.0,
            attn_logit_softcapping=50.0,
        ),
    ),
}


def word_tokenizer(words: list[str]) -> Any:
    """A word-level fast tokenizer over ``words`` with <unk>, <pad> and a prepended <bos>."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<pad>": 1, "<bos>": 2}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", 2)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", unk_token="<unk>", pad_token="<pad>")


def random_model(
    arch: str, vocab_size: int, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any
) -> PreTrainedModel:
    """A randomly initialised causal LM of ``arch`` ("llama", "gemma2", "gpt2")."""
    from transformers import Gemma2Config, Gemma2ForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    classes = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "gemma2": (Gemma2Config, Gemma2ForCausalLM),
        "gpt2": (GPT2Config, GPT2LMHeadModel),
    }
    if arch not in classes:
        raise ValueError(f"unknown arch {arch!r}; choose one of {sorted(classes)}")
    cfg_cls, model_cls = classes[arch]
    kw = {**SMALL.get(arch, {}), **overrides, "vocab_size": vocab_size}
    if arch == "gpt2":
        kw.setdefault("bos_token_id", 2)
        kw.setdefault("eos_token_id", 2)
    else:
        kw.setdefault("bos_token_id", 2)
        kw.setdefault("pad_token_id", 1)
        kw.setdefault("eos_token_id", 2)
    cfg = cfg_cls(**kw)
    if arch == "gemma2":
        cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = model_cls(cfg).to(dtype).eval()
    return model


def save_random_model(folder: str | Path, arch: str, words: list[str], seed: int = 0, **overrides: Any) -> Path:
    """Write a random ``arch`` model plus a word tokenizer over ``words`` to ``folder``."""
    folder = Path(folder)
    tok = word_tokenizer(words)
    model = random_model(arch, vocab_size=len(tok), seed=seed, **overrides)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
