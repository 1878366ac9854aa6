"""Greedy generation with fixed additive steering of every MLP output (FADE faithfulness, spec §8).

One nnsight ``generate`` per chunk of rows: the model's own decoding loop (with its KV cache), the
offsets added at every step. Remote, all chunks go as one ``model.session`` -- one request for a
whole steering run, instead of one request per generated token.
"""

from __future__ import annotations

from typing import Any

import nnsight
import torch

from pie_lib.engine import remote as remote_
from pie_lib.engine.traces import _forward_steps
from pie_lib.models.loading import LoadedModel


def steered_greedy(
    model: LoadedModel, jobs: list[tuple[torch.Tensor, torch.Tensor]], gen_tokens: int
) -> list[torch.Tensor]:
    """Greedy continuations of each job's prompts with its offsets added to every MLP output.

    Args:
        jobs: ``(prompt_ids [b, T0], offsets [L, b, 1, D])`` pairs; the offsets are added at every
            position of the prompt and of every generated token.
        gen_tokens: new tokens per row. End-of-sequence never stops a row early (``eos_token_id``
            is unset for this call), so every row has exactly ``gen_tokens`` new tokens.
    Returns:
        ``[b, gen_tokens]`` generated ids per job (on the CPU).
    """
    model.require_generate("steered generation")
    if gen_tokens < 1 or not jobs:
        return [torch.zeros(ids.shape[0], max(gen_tokens, 0), dtype=torch.long) for ids, _ in jobs]
    steps = [env for _, _, env in _forward_steps(model, (model.arch.mlp_out,))]
    lm = model.lm
    pad = getattr(model.tokenizer, "pad_token_id", None)
    kw = {
        "max_new_tokens": gen_tokens,
        "do_sample": False,
        "eos_token_id": None,
        "pad_token_id": pad if pad is not None else 0,
    }
    work = [(remote_.host(model, ids), remote_.host(model, off)) for ids, off in jobs]
    if not remote_.is_remote(model):
        return [_generate_local(model, steps, ids, off, gen_tokens, kw) for ids, off in work]
    with torch.no_grad(), remote_.session(model, "generate-session"):
        results = nnsight.save([])
        for ids, off in work:
            with lm.generate(ids, **kw) as tracer:
                for step in tracer.iter[0:gen_tokens]:  # one forward per new token
                    for layer, env in enumerate(steps):
                        y = env.output
                        env.output = y + off[layer].to(y.device, y.dtype)
                results.append(tracer.result[:, ids.shape[1] :])
    return [r.cpu() for r in results]


@torch.no_grad()
def _generate_local(
    model: LoadedModel, steps: list[Any], ids: torch.Tensor, off: torch.Tensor, gen_tokens: int, kw: dict
) -> torch.Tensor:
    lm = model.lm
    with lm.generate(ids, **kw) as tracer:
        for step in tracer.iter[0:gen_tokens]:
            for layer, env in enumerate(steps):
                y = env.output
                env.output = y + off[layer].to(y.device, y.dtype)
        new = nnsight.save(tracer.result[:, ids.shape[1] :])
    return new.cpu()
