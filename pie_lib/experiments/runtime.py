"""Runtime of each method's selection on equal footing (for the related-methods comparison).

The ``seconds`` column of a sweep is the wall time of a whole batch (all methods together), so it
cannot rank methods. :func:`time_methods` instead gives every method a fresh batch context (the
clean / corrupted forwards and decoder rows every method needs, timed separately as
``seconds_context``) and times only its own work: gradients or masks or patching forwards it
triggers, and the top-K selection.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

import pandas as pd
import torch

if TYPE_CHECKING:
    from pie_lib.clt.transcoder import CrossLayerTranscoder
    from pie_lib.data.tasks import Task
    from pie_lib.models.loading import LoadedModel


def time_methods(
    model: LoadedModel,
    clt: CrossLayerTranscoder,
    methods: Sequence[str],
    task: str = "ioi",
    n: int = 8,
    k: int = 50,
    seed: int = 0,
    data_seed: int = 0,
    params: Any = None,
    scoring: Any = None,
    repeats: int = 1,
) -> pd.DataFrame:
    """Seconds each method takes to select a K-circuit on one batch of ``n`` generated pairs.

    Args:
        model, clt: loaded model and CLT. methods: registry names.
        task, n, data_seed: the pairs (the largest same-length batch of them is used).
        k, seed: budget and method seed. params, scoring: MethodParams / ScoringConfig.
        repeats: timings per method (the minimum is reported).
    Returns:
        ``method, k, n_prompts, seconds_context, seconds_select, seconds_per_prompt``
        (``seconds_per_prompt = seconds_select / n_prompts``).
    """
    from pie_lib.data.tasks import generate_task
    from pie_lib.prune.context import BatchContext, ScoringConfig
    from pie_lib.prune.occurrences import tokenize_pairs
    from pie_lib.prune.params import MethodParams
    from pie_lib.prune.registry import get_methods

    params = params or MethodParams()
    scoring = scoring or ScoringConfig(chunk=512)
    pairs = generate_task(cast("Task", task), model.tokenizer, n, seed=data_seed).pairs  # it refuses unknown names
    batch = max(tokenize_pairs(model, pairs, batch_size=max(1, n)).batches, key=lambda b: b.size)
    rows = []
    for m in get_methods(list(methods)):
        best_ctx, best = float("inf"), float("inf")
        for _ in range(max(1, repeats)):
            t0 = time.perf_counter()
            ctx = BatchContext(model, clt, batch, scoring)
            t1 = time.perf_counter()
            m.select(ctx, torch.full((batch.size,), int(k), dtype=torch.long), seed, params)
            t2 = time.perf_counter()
            best_ctx, best = min(best_ctx, t1 - t0), min(best, t2 - t1)
        rows.append(
            {
                "method": m.name,
                "k": int(k),
                "n_prompts": int(batch.size),
                "seconds_context": best_ctx,
                "seconds_select": best,
                "seconds_per_prompt": best / batch.size,
            }
        )
    return pd.DataFrame(rows)


__all__ = ["time_methods"]
