"""PAHQ-style mixed precision for patching forwards (spec §10).

PAHQ runs the components under investigation in full precision and everything else in reduced
precision. Here the unit is a decoder layer: :func:`reduced_precision` casts the weights of every
decoder layer *not* in ``full_precision_layers`` to a fast dtype (bfloat16 by default) for the
duration of a ``with`` block and restores the original tensors afterwards (the originals are
kept, not re-cast, so nothing is lost). Hidden states are cast to the fast dtype on entry to a
reduced layer and back to the model dtype on exit, so full-precision layers, the embeddings, the
final norm and the unembedding see model-dtype inputs. Patching offsets subtracted inside a
reduced layer are cast to its dtype by :func:`pie_lib.engine.traces.patched_last_logits`.

Typical choice of the full-precision set: the source layers of the occurrences being patched
(:func:`source_layers`), where the CLT writes are read and removed.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterable, Iterator

import torch

from pie_lib.engine.remote import is_remote
from pie_lib.engine.traces import patched_last_logits
from pie_lib.errors import SettingError
from pie_lib.models.arch import get_path
from pie_lib.models.loading import LoadedModel
from pie_lib.prune.occurrences import Occurrences


def fast_dtype(device: torch.device | str) -> torch.dtype:
    """The reduced dtype: bfloat16 on CPU and on GPUs that support it, else float16."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def _cast_tree(x: Any, dtype: torch.dtype) -> Any:
    if torch.is_tensor(x):
        return x.to(dtype) if x.is_floating_point() else x
    if isinstance(x, tuple):
        return tuple(_cast_tree(v, dtype) for v in x)
    if isinstance(x, list):
        return [_cast_tree(v, dtype) for v in x]
    if isinstance(x, dict):
        return {k: _cast_tree(v, dtype) for k, v in x.items()}
    return x


def source_layers(occ: Occurrences, rows: torch.Tensor | None = None) -> list[int]:
    """Sorted source layers of occurrences ``rows`` (all when None): a natural full-precision set."""
    layer = occ.layer if rows is None else occ.layer[rows]
    return sorted(int(x) for x in torch.unique(layer.cpu()))


@contextlib.contextmanager
def reduced_precision(
    model: LoadedModel, full_precision_layers: Iterable[int], dtype: torch.dtype | None = None
) -> Iterator[list[int]]:
    """Run decoder layers outside ``full_precision_layers`` in ``dtype`` inside the block.

    Args:
        model: a locally loaded model (its weights are swapped in place, then restored).
        full_precision_layers: layer indices kept in the model's own dtype.
        dtype: reduced dtype (default :func:`fast_dtype` of the model's device).
    Yields:
        the indices of the layers that run in reduced precision.
    """
    if is_remote(model):
        raise SettingError(
            "PAHQ swaps weight precision in place, which a remote server's weights cannot do; run it without --remote"
        )
    dtype = dtype or fast_dtype(model.device)
    keep = {int(i) for i in full_precision_layers}
    layers = get_path(model.hf, model.arch.layers)
    reduced = [i for i in range(len(layers)) if i not in keep]
    out_dtype = model.dtype
    saved: list[tuple[Any, str, torch.Tensor, bool]] = []
    handles = []
    try:
        for i in reduced:
            mod = layers[i]
            for sub in mod.modules():
                for name, p in list(sub._parameters.items()):
                    if p is not None and p.is_floating_point() and p.dtype != dtype:
                        saved.append((sub, name, p.data, True))
                        p.data = p.data.to(dtype)
                for name, b in list(sub._buffers.items()):
                    if b is not None and b.is_floating_point() and b.dtype != dtype:
                        saved.append((sub, name, b, False))
                        sub._buffers[name] = b.to(dtype)

            def pre(module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
                return _cast_tree(args, dtype), _cast_tree(kwargs, dtype)

            def post(module: Any, args: tuple, output: Any, out_dtype=out_dtype) -> Any:
                return _cast_tree(output, out_dtype)

            handles.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(mod.register_forward_hook(post))
        yield reduced
    finally:
        for h in handles:
            h.remove()
        for sub, name, t, is_param in reversed(saved):
            if is_param:
                sub._parameters[name].data = t
            else:
                sub._buffers[name] = t


def pahq_patched_last_logits(
    model: LoadedModel,
    input_ids: torch.Tensor,
    offsets: torch.Tensor,
    full_precision_layers: Iterable[int],
    dtype: torch.dtype | None = None,
    with_logsumexp: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`~pie_lib.engine.traces.patched_last_logits` with PAHQ mixed precision.

    Casting costs one pass over the reduced layers' weights per call; to amortise it over many
    patching forwards wrap them in one ``with reduced_precision(...)`` block instead.

    Args:
        input_ids: ``[B, T]``; offsets: ``[L, B, T, D]`` subtracted from the MLP outputs.
        full_precision_layers: decoder layers kept in the model dtype.
    Returns:
        (``[B, V]`` last-token logits in float32, logsumexp metric ``[B]`` or None).
    """
    with reduced_precision(model, full_precision_layers, dtype):
        logits, lse = patched_last_logits(model, input_ids, offsets, with_logsumexp=with_logsumexp)
    return logits.float(), (lse.float() if lse is not None else None)


def pahq_run(
    evaluator: Any, variants: Any, full_precision_layers: Iterable[int] | None = None, dtype: torch.dtype | None = None
) -> Any:
    """:meth:`PatchEvaluator.run <pie_lib.prune.patching.PatchEvaluator.run>` under PAHQ precision.

    Args:
        evaluator: a ``PatchEvaluator``; variants: its ``Variants``.
        full_precision_layers: layers kept in the model dtype; default the source layers of the
            occurrences the variants list.
    Returns:
        the ``PatchResult`` (metric, KL, prediction change) of the mixed-precision forwards.
    """
    if full_precision_layers is None:
        full_precision_layers = source_layers(evaluator.occ, variants.occ)
    with reduced_precision(evaluator.model, full_precision_layers, dtype):
        return evaluator.run(variants)


__all__ = ["fast_dtype", "pahq_patched_last_logits", "pahq_run", "reduced_precision", "source_layers"]
