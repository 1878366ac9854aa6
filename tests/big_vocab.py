"""The memory tests' helpers: a tiny bf16 Llama whose (un)embedding dominates every other weight,
and the largest single allocation a call makes."""

from __future__ import annotations

from pathlib import Path

import torch

from pie_lib.models.loading import LoadedModel, load_model
from pie_lib.models.random_init import random_model, word_tokenizer

VOCAB, WIDTH = 8192, 64


def big_vocab_model(folder: Path, backend: str, tied: bool) -> LoadedModel:
    """Save a 2-layer Llama with a ``VOCAB x WIDTH`` (un)embedding (tied or not) to ``folder`` and
    load it in bf16 on the CPU through ``backend``."""
    hf = random_model(
        "llama",
        vocab_size=VOCAB,
        hidden_size=WIDTH,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=2,
        tie_word_embeddings=tied,
    )
    hf.save_pretrained(folder)
    word_tokenizer([f"t{i}" for i in range(VOCAB - 3)]).save_pretrained(str(folder))
    model = load_model(folder, device="cpu", dtype="bfloat16", backend=backend)
    assert model.vocab_size == VOCAB and model.dtype == torch.bfloat16 and model.backend == backend
    return model


def max_allocation(fn) -> int:
    """The largest single CPU allocation (bytes) any op makes while ``fn`` runs."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max((e.self_cpu_memory_usage for e in prof.events()), default=0)
