"""Train the toy world's tiny causal LMs (Llama or GPT-2 architecture) on the synthetic corpus.

One training row = ``<bos>`` + one corpus text, right-padded (rows of similar length are batched
together to waste little compute on padding). The loss is next-token cross-entropy on every real
token, with the task answers (the IOI name after "to", the argument after each ``:param``) weighted
``1 + answer_weight``: they are ~4% of tokens, and up-weighting them makes the in-context circuits
form within a CPU-minutes budget. Fresh text every step (no epochs), so the model has to learn
the tasks in context rather than memorise sentences.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Sequence

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from pie_lib.data.pairs import Pair
from pie_lib.toy.corpus import ToyCorpusConfig, training_texts

Arch = Literal["llama", "gpt2"]

#: Training steps per arch: Llama's Doc-String accuracy crosses 80% later (~1750 steps vs ~1250).
DEFAULT_STEPS: dict[str, int] = {"llama": 2500, "gpt2": 2000}


@dataclass
class LMConfig:
    """Model shape and training schedule (fields double as ``build`` CLI defaults)."""

    d_model: int = 96
    n_layers: int = 4
    n_heads: int = 4
    d_mlp: int = 256  # Llama's gated MLP width; GPT-2 uses ``gpt2_d_mlp``
    gpt2_d_mlp: int = 384
    max_positions: int = 128
    steps: int | None = None  # None: DEFAULT_STEPS[arch]
    batch_size: int = 64
    lr: float = 3e-3
    warmup: int = 100
    answer_weight: float = 4.0
    weight_decay: float = 0.01
    seed: int = 0
    corpus: ToyCorpusConfig = field(default_factory=ToyCorpusConfig)


def make_model(arch: Arch, vocab_size: int, cfg: LMConfig, tokenizer: Any) -> PreTrainedModel:
    """A freshly initialised tiny model of architecture ``arch`` (tied embeddings, no dropout)."""
    ids = dict(bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id, eos_token_id=None)
    if arch == "llama":
        conf = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=cfg.d_model,
            intermediate_size=cfg.d_mlp,
            num_hidden_layers=cfg.n_layers,
            num_attention_heads=cfg.n_heads,
            num_key_value_heads=cfg.n_heads,
            max_position_embeddings=cfg.max_positions,
            tie_word_embeddings=True,
            **ids,
        )
        return LlamaForCausalLM(conf)
    if arch == "gpt2":
        conf = GPT2Config(
            vocab_size=vocab_size,
            n_positions=cfg.max_positions,
            n_embd=cfg.d_model,
            n_layer=cfg.n_layers,
            n_head=cfg.n_heads,
            n_inner=cfg.gpt2_d_mlp,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            tie_word_embeddings=True,
            **ids,
        )
        return GPT2LMHeadModel(conf)
    raise ValueError(f"unknown toy arch {arch!r}; valid archs are llama, gpt2")


def encode_batch(tokenizer: Any, texts: Sequence[str]) -> dict[str, torch.Tensor]:
    """``<bos>``-prefixed, right-padded ``input_ids`` / ``attention_mask`` ``[B, T]``."""
    return tokenizer(list(texts), return_tensors="pt", padding=True)


def train_lm(
    arch: Arch,
    tokenizer: Any,
    cfg: LMConfig,
    log_every: int = 250,
    eval_fn: Callable[[PreTrainedModel], dict[str, float]] | None = None,
) -> tuple[PreTrainedModel, dict]:
    """Train a toy LM from scratch.

    Args:
        arch, tokenizer, cfg: what to train, on which vocabulary, how.
        log_every: print the smoothed loss (and ``eval_fn``'s numbers) every this many steps.
        eval_fn: optional progress probe, e.g. held-out task accuracies.

    Returns:
        (model in eval mode, stats dict with ``train_steps``, ``final_loss``, ``seconds``).
    """
    torch.manual_seed(cfg.seed)
    steps = cfg.steps or DEFAULT_STEPS[arch]
    model = make_model(arch, len(tokenizer), cfg, tokenizer)
    batches = _length_bucketed_batches(tokenizer, cfg, steps)
    param_id = tokenizer.convert_tokens_to_ids("param")
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.98),
    )

    def lr_at(step: int) -> float:  # linear warm-up, cosine decay to 5%
        if step < cfg.warmup:
            return cfg.lr * (step + 1) / cfg.warmup
        frac = (step - cfg.warmup) / max(1, steps - cfg.warmup)
        return cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))

    model.train()
    t0, ema = time.time(), None
    for step, (texts, kinds) in enumerate(batches):
        batch = encode_batch(tokenizer, texts)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        logits = model(**batch).logits[:, :-1]  # [B, T-1, V] predicts ids[:, 1:]
        weight = mask[:, 1:].float() * (1 + cfg.answer_weight * _answer_mask(ids, mask, kinds, param_id))
        ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")  # [B, T-1]
        loss = (ce * weight).sum() / weight.sum()
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if log_every and (step + 1) % log_every == 0:
            extra = ""
            if eval_fn is not None:
                model.eval()
                extra = " " + " ".join(f"{k} {v:.3f}" for k, v in eval_fn(model).items())
                model.train()
            print(f"  [{arch} lm] step {step + 1}/{steps} loss {ema:.3f}{extra} ({time.time() - t0:.0f}s)", flush=True)
    model.eval()
    return model, {
        "train_steps": steps,
        "final_loss": round(float(ema or 0.0), 4),
        "seconds": round(time.time() - t0, 1),
    }


def _length_bucketed_batches(tokenizer: Any, cfg: LMConfig, steps: int) -> list[tuple[list[str], list[str]]]:
    """``steps`` batches of (texts, kinds); within pools of 32 batches rows are sorted by length."""
    texts, kinds = training_texts(steps * cfg.batch_size, seed=cfg.seed, cfg=cfg.corpus)
    lengths = [len(x) for x in tokenizer(texts)["input_ids"]]
    rng = random.Random(cfg.seed + 1)
    pool = 32 * cfg.batch_size
    batches = []
    for start in range(0, len(texts), pool):
        idx = sorted(range(start, min(start + pool, len(texts))), key=lambda i: lengths[i])
        chunk = [idx[j : j + cfg.batch_size] for j in range(0, len(idx), cfg.batch_size)]
        rng.shuffle(chunk)
        batches += [([texts[i] for i in b], [kinds[i] for i in b]) for b in chunk]
    return batches


def _answer_mask(ids: torch.Tensor, mask: torch.Tensor, kinds: Sequence[str], param_id: int) -> torch.Tensor:
    """``[B, T-1]`` float mask of the next-token targets that are task answers.

    IOI rows: the final name (the token before the closing "."); Doc-String rows: every token
    that follows ``param``. Indexing matches ``ids[:, 1:]``.
    """
    out = torch.zeros(ids.shape[0], ids.shape[1] - 1)
    last = mask.sum(1) - 1  # index of the last real token ("." for IOI)
    for r, kind in enumerate(kinds):
        if kind == "ioi":
            out[r, last[r] - 2] = 1.0  # target index last-1 in ids -> last-2 in ids[:, 1:]
        elif kind == "docstring":
            out[r] = (ids[r, :-1] == param_id).float()
    return out


def target_token_id(tokenizer: Any, target: str) -> int:
    """A target's token: the LAST token of its tokenisation (spec §1)."""
    return tokenizer(target, add_special_tokens=False)["input_ids"][-1]


@torch.no_grad()
def last_token_logits(
    model: PreTrainedModel, tokenizer: Any, texts: Sequence[str], batch_size: int = 128
) -> torch.Tensor:
    """Logits ``[N, V]`` at each prompt's last real token (prompts get ``<bos>``, right padding)."""
    out = []
    for i in range(0, len(texts), batch_size):
        batch = encode_batch(tokenizer, texts[i : i + batch_size])
        logits = model(**batch).logits  # [B, T, V]
        last = batch["attention_mask"].sum(1) - 1
        out.append(logits[torch.arange(len(last)), last])
    return torch.cat(out)


def task_accuracy(model: PreTrainedModel, tokenizer: Any, pairs: Sequence[Pair]) -> float:
    """Fraction of clean prompts whose argmax over the whole vocabulary is the correct target."""
    logits = last_token_logits(model, tokenizer, [p.text_clean for p in pairs])
    gold = torch.tensor([target_token_id(tokenizer, p.io_clean) for p in pairs])
    return float((logits.argmax(-1) == gold).float().mean())
