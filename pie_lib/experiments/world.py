"""What a model + CLT pair is, and how good it is: the toy world's card, recomputed.

- :func:`world_card` -- architecture and sizes of the model and its CLT.
- :func:`task_accuracy` -- on generated IOI / Doc-String pairs: top-1 accuracy of the correct
  target, fraction with ``logit[correct] > logit[wrong]``, mean logit difference.
- :func:`clt_quality` -- per layer, over a set of texts (BOS and padding excluded): the CLT's
  FVU of the MLP outputs (:func:`pie_lib.clt.fvu`) and L0, the mean number of active features
  per token (:func:`pie_lib.clt.mean_l0`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

import pandas as pd
import torch

if TYPE_CHECKING:
    from pie_lib.clt.transcoder import CrossLayerTranscoder
    from pie_lib.data.tasks import Task
    from pie_lib.models.loading import LoadedModel


def world_card(model: LoadedModel, clt: CrossLayerTranscoder) -> pd.DataFrame:
    """``quantity, value`` rows: model architecture, layers, d_model, vocabulary, parameters,
    CLT features per layer, activation, decoder targets."""
    try:
        n_params: Any = sum(p.numel() for p in model.hf.parameters())
    except Exception:  # remote / meta models
        n_params = "n/a"
    rows = [
        ("model", model.name),
        ("architecture", model.arch.name),
        ("layers", model.n_layers),
        ("d_model", model.d_model),
        ("vocabulary", len(model.tokenizer)),
        ("parameters", n_params),
        ("CLT features per layer", clt.n_features),
        ("CLT features (total)", clt.n_features * clt.n_layers),
        ("CLT activation", "JumpReLU" if clt.threshold is not None else getattr(clt.config, "activation", "relu")),
        ("CLT writes to", "every later layer (cross-layer)" if clt.n_out(0) > 1 else "its own layer"),
    ]
    return pd.DataFrame(rows, columns=["quantity", "value"]).astype({"value": str})


def task_pairs(model: LoadedModel, task: str, n: int, seed: int, heldout: bool = True) -> list:
    """``n`` pairs of ``task``: the toy world's held-out split (templates / name and argument pairs
    never trained on) when ``heldout``, else the plain generator (any tokenizer)."""
    from pie_lib.data.tasks import generate_task

    if heldout:
        from pie_lib.toy.corpus import heldout_docstring_pairs, heldout_ioi_pairs

        make = {"ioi": heldout_ioi_pairs, "docstring": heldout_docstring_pairs}[task]
        return make(model.tokenizer, n, seed=seed).pairs
    return generate_task(cast("Task", task), model.tokenizer, n, seed=seed).pairs  # it refuses unknown names


@torch.no_grad()
def task_accuracy(
    model: LoadedModel, task: str, n: int = 500, seed: int = 1234, heldout: bool = True, batch_size: int = 128
) -> dict[str, Any]:
    """Accuracy of ``model`` on ``n`` pairs of ``task`` (clean prompts, last-token logits).

    Returns:
        ``{"task", "n", "top1", "beats_wrong", "logit_diff"}``: fraction whose argmax over the
        vocabulary is the correct target (the toy build's accuracy), fraction with
        ``logit[correct] > logit[wrong]``, mean ``logit[correct] - logit[wrong]``.
    """
    from pie_lib.engine.traces import run_with_cache
    from pie_lib.prune.occurrences import tokenize_pairs

    pairs = task_pairs(model, task, n, seed, heldout)
    top1 = beats = total = 0
    diff = 0.0
    for b in tokenize_pairs(model, pairs, batch_size=batch_size).batches:
        logits = run_with_cache(model, b.clean_ids).last_logits.float().cpu()
        c, w = b.correct.cpu(), b.wrong.cpu()
        lc = logits.gather(1, c[:, None])[:, 0]
        lw = logits.gather(1, w[:, None])[:, 0]
        top1 += int((logits.argmax(-1) == c).sum())
        beats += int((lc > lw).sum())
        diff += float((lc - lw).sum())
        total += b.size
    return {
        "task": task,
        "n": total,
        "top1": top1 / max(total, 1),
        "beats_wrong": beats / max(total, 1),
        "logit_diff": diff / max(total, 1),
    }


def accuracy_table(
    model: LoadedModel,
    tasks: Sequence[str] = ("ioi", "docstring"),
    n: int = 500,
    seed: int = 1234,
    heldout: bool = True,
) -> pd.DataFrame:
    """:func:`task_accuracy` for each task, one row each."""
    return pd.DataFrame([task_accuracy(model, t, n, seed, heldout) for t in tasks])


def heldout_corpus(n: int = 300, seed: int = 1234) -> list[str]:
    """Held-out toy texts (IOI on held-out templates, fresh functions, filler) for FVU and L0."""
    from pie_lib.toy.corpus import heldout_texts

    return heldout_texts(n, seed=seed)


@torch.no_grad()
def clt_quality(
    model: LoadedModel, clt: CrossLayerTranscoder, texts: Sequence[str], batch_size: int = 32, max_tokens: int = 64
) -> pd.DataFrame:
    """Per-layer FVU and L0 of ``clt`` on ``texts`` (BOS and padding positions excluded).

    Returns:
        ``layer, fvu, l0, n_tokens``.
    """
    from pie_lib.clt import fvu, mean_l0
    from pie_lib.engine.traces import run_with_cache

    tok = model.tokenizer
    resid, mlp = [], []
    side = tok.padding_side
    tok.padding_side = "right"  # padding after the text: causal attention leaves real tokens untouched
    try:
        encs = [
            tok(
                list(texts[i : i + batch_size]),
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=max_tokens,
            )
            for i in range(0, len(texts), batch_size)
        ]
    finally:
        tok.padding_side = side
    for enc in encs:
        ids, mask = enc["input_ids"], enc["attention_mask"].bool()
        if tok.bos_token_id is not None and not bool((ids[:, 0] == tok.bos_token_id).all()):
            ids = torch.cat([torch.full((ids.shape[0], 1), tok.bos_token_id), ids], 1)
            mask = torch.cat([torch.ones(ids.shape[0], 1, dtype=torch.bool), mask], 1)
        mask[:, 0] = False  # BOS
        cache = run_with_cache(model, ids)
        keep = mask.to(cache.resid_mid.device)
        resid.append(cache.resid_mid[:, keep].float().cpu())
        mlp.append(cache.mlp_out[:, keep].float().cpu())
    x, y = torch.cat(resid, 1), torch.cat(mlp, 1)
    # on the CLT's own device: the caller's CLT is not moved
    acts = clt.encode(x.to(clt.W_enc.device, clt.W_enc.dtype))
    recon = clt.decode(acts)
    f, l0 = fvu(recon.float().cpu(), y), mean_l0(acts.cpu())
    return pd.DataFrame(
        {"layer": range(clt.n_layers), "fvu": f.double().numpy(), "l0": l0.double().numpy(), "n_tokens": x.shape[1]}
    )


def compare_with_summary(summary: dict | None, accuracy: pd.DataFrame, quality: pd.DataFrame) -> pd.DataFrame:
    """The build's numbers (one arch of ``toy_summary()["archs"]``, or None) next to ours.

    Returns:
        ``quantity, build, recomputed``: held-out accuracies (top-1), per-layer FVU and L0 and
        their means; ``build`` is NaN for a model without a build summary.
    """
    s = summary or {}
    acc = accuracy.set_index("task")
    rows = []
    for task, key, name in (
        ("ioi", "ioi_acc", "IOI accuracy (top-1)"),
        ("docstring", "docstring_acc", "Doc-String accuracy (top-1)"),
    ):
        if task in acc.index:
            rows.append((name, s.get(key, float("nan")), float(acc.loc[task, "top1"])))
    for key, col in (("fvu", "FVU"), ("l0", "L0")):
        built = list(s.get(key, []))
        for layer, v in zip(quality["layer"], quality[key]):
            rows.append((f"{col} layer {layer}", built[layer] if layer < len(built) else float("nan"), float(v)))
        rows.append(
            (f"{col} mean over layers", sum(built) / len(built) if built else float("nan"), float(quality[key].mean()))
        )
    return pd.DataFrame(rows, columns=["quantity", "build", "recomputed"])


def quality_long(summary: dict | None, quality: pd.DataFrame) -> pd.DataFrame:
    """``layer, fvu, l0, source`` rows of the build summary ("build") and ``quality`` ("recomputed")."""
    parts = [quality[["layer", "fvu", "l0"]].assign(source="recomputed")]
    if summary and summary.get("fvu"):
        parts.insert(
            0,
            pd.DataFrame(
                {
                    "layer": range(len(summary["fvu"])),
                    "fvu": summary["fvu"],
                    "l0": summary.get("l0", [float("nan")] * len(summary["fvu"])),
                    "source": "build",
                }
            ),
        )
    return pd.concat(parts, ignore_index=True)


__all__ = [
    "accuracy_table",
    "clt_quality",
    "compare_with_summary",
    "heldout_corpus",
    "quality_long",
    "task_accuracy",
    "task_pairs",
    "world_card",
]
