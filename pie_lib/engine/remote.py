"""What a trace may hold when it runs on an NDIF server, and how many requests a run makes.

The real server (not nnsight's ``remote="local"`` simulation) differs from a local run in four
ways that every engine trace is written around:

- the ``with`` block's source and the names it reads are pickled; anything from a package the
  server does not have (pie_lib) is pickled *by reference* and fails to unpickle there. Engine
  blocks therefore read only nnsight envoys, torch tensors and plain Python values, plus the
  pure-torch rules of :mod:`pie_lib.engine.rules`, which are shipped by value (their source)
  through ``nnsight.register`` (:func:`ship_rules`);
- only values ``.save()``d *and bound to a name in the block's own frame* come back: blocks
  stack per-layer values into one tensor bound inside the block, or fill an ``nnsight.save([])``
  list created inside it;
- the client's model is a meta skeleton: a tensor moved to its "device" loses its values, so
  inputs stay on the CPU (:func:`host`) and are moved to the activation's device inside the block;
- the server's weights have ``requires_grad=False``: gradient leaves are marked inside the block.

Every request costs a queue round trip, so the traces of one step go as one
``model.session(remote=True)`` (:func:`session`) and the number of requests is counted
(:func:`request_count`, printed by ``pie prune`` / ``pie interpret`` when ``--remote``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import nnsight
import torch

if TYPE_CHECKING:
    from pie_lib.models.loading import LoadedModel


@dataclass
class RequestLog:
    """Requests sent to the remote backend by this process (one per remote trace/session/generate)."""

    total: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)

    def add(self, kind: str) -> None:
        self.total += 1
        self.by_kind[kind] = self.by_kind.get(kind, 0) + 1


_LOG = RequestLog()


def is_remote(model: Any) -> bool:
    """True for NDIF (``remote=True``) and for nnsight's local simulation (``remote="local"``)."""
    return getattr(model, "remote", False) not in (False, None)


def request_count() -> int:
    """How many remote requests this process has sent so far."""
    return _LOG.total


def request_summary() -> dict[str, Any]:
    """``{"total": n, "by_kind": {...}}`` (a copy)."""
    return {"total": _LOG.total, "by_kind": dict(_LOG.by_kind)}


def reset_requests() -> None:
    _LOG.total = 0
    _LOG.by_kind.clear()


def note_request(model: Any, kind: str) -> None:
    """Count one request if ``model`` runs remotely."""
    if is_remote(model):
        _LOG.add(kind)


_SHIPPED = False


def ship_rules() -> None:
    """Have nnsight pickle :mod:`pie_lib.engine.rules` by value (its source), once per process.

    The server cannot import pie_lib; the rules are plain torch, so their source rebuilds there.
    Nothing else of pie_lib is referenced from inside an engine block.
    """
    global _SHIPPED
    if _SHIPPED:
        return
    from pie_lib.engine import rules

    nnsight.register(rules)
    _SHIPPED = True


def host(model: LoadedModel, t: torch.Tensor) -> torch.Tensor:
    """Where an input tensor goes before a trace: the model's device locally, the CPU when remote.

    A remote model's device is meta; a tensor moved there keeps its shape and loses its values.
    Blocks move it to the activation's device themselves (``x.to(out.device)``).
    """
    if is_remote(model):
        return t.detach().cpu()
    return t.to(model.device)


def trace(model: LoadedModel, *inputs: Any, kind: str = "trace", **kwargs: Any) -> Any:
    """``lm.trace`` with the model's ``remote`` setting: every pie_lib trace is opened here (or inside
    a :func:`session`). Remote, it is one request, counted under ``kind``."""
    if "remote" not in kwargs:
        kwargs.update(remote_kwargs(model, kind))
    elif kwargs["remote"] is False:
        kwargs.pop("remote")
    return model.lm.trace(*inputs, **kwargs)


def remote_kwargs(model: LoadedModel, kind: str = "trace") -> dict[str, Any]:
    """``{"remote": ...}`` for an nnsight call opened directly on ``lm`` (``lm.generate`` must be the
    ``with`` statement's own call), counting it as one request when remote."""
    if model.remote is False:
        return {}
    ship_rules()
    note_request(model, kind)
    return {"remote": model.remote}


def session(model: LoadedModel, kind: str = "session") -> Any:
    """``model.lm.session(remote=...)``: one request for every trace opened inside it (remote only).

    Use it directly in a ``with`` statement of the function whose block it is (nnsight captures the
    block from the frame that enters it). The block runs on the server: only envoys, tensors and
    plain values may be read in it, and values come back through names bound in it
    (``nnsight.save([])`` lists).
    """
    if not is_remote(model):
        raise ValueError("engine sessions are for remote models; run the traces directly when local")
    ship_rules()
    note_request(model, kind)
    return model.lm.session(remote=model.remote)


def server_dtype(model: LoadedModel) -> torch.dtype:
    """The dtype the server's weights are in (one tiny request; the deployment decides it).

    Locally: the model's own dtype, no request.
    """
    if not is_remote(model):
        return model.dtype
    cached = model.extra.get("server_dtype")
    if cached is not None:
        return cached
    bos = getattr(model.tokenizer, "bos_token_id", None)
    ids = torch.tensor([[bos if bos is not None else 0]])
    lm = model.lm
    with trace(model, ids, kind="probe"):
        out = lm.output
        logits = nnsight.save(out.logits if hasattr(out, "logits") else out[0])
    dt = logits.dtype
    model.extra["server_dtype"] = dt
    return dt
