"""The model and its CLT, resolved and loaded together: the one loader every stage uses.

"toy" / "toy:<arch>" names are resolved by :func:`pie_lib.toy.resolve_toy` (the one toy-name
resolver); any other name is a local folder or a hub id.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pie_lib.clt.io import load_clt
from pie_lib.clt.transcoder import CrossLayerTranscoder
from pie_lib.errors import WeightsUnavailableError
from pie_lib.models.loading import Backend, LoadedModel, Remote, check_model_source, load_model
from pie_lib.provenance import check_model_name
from pie_lib.toy import resolve_toy, toy_arch


@dataclass(frozen=True)
class World:
    """A loaded model, its CLT, and where each came from (None when passed in already loaded)."""

    model: LoadedModel
    clt: CrossLayerTranscoder
    model_path: str | None
    clt_path: str | None


def resolve_checkpoint(name: str | os.PathLike, kind: Literal["model", "clt"]) -> str:
    """Map "toy" / "toy:<arch>" to the shipped toy-world folder of ``kind`` (which must exist); other names pass."""
    path = resolve_toy(name, kind)
    if toy_arch(name) is not None and not Path(path).exists():
        raise WeightsUnavailableError(
            f"the toy world ({name}) is not built: {path} is missing; run `python -m pie_lib.toy.build` "
            "or pass --model and --clt"
        )
    return path


def resolve_checkpoints(model: str | os.PathLike, clt: str | os.PathLike) -> tuple[str, str]:
    """:func:`resolve_checkpoint` of a model and a CLT name."""
    return resolve_checkpoint(model, "model"), resolve_checkpoint(clt, "clt")


def load_world(
    model: str | os.PathLike | LoadedModel = "toy",
    clt: str | os.PathLike | CrossLayerTranscoder = "toy",
    device: str | None = None,
    dtype: str | None = None,
    remote: Remote = False,
    backend: Backend | str = "auto",
) -> World:
    """Load what is not loaded yet and check that the CLT fits the model.

    Cheap checks come first: a model name that can be neither a folder nor a hub id fails before
    anything is read; a CLT loaded here is read on the CPU next (a broken CLT fails before the model
    is loaded), then moved to the model's device (it stays on the CPU for a remote model).
    ``backend`` is :func:`~pie_lib.models.loading.load_model`'s (auto, native or hf).
    """
    model_path = None if isinstance(model, LoadedModel) else resolve_checkpoint(model, "model")
    clt_path = None if isinstance(clt, CrossLayerTranscoder) else resolve_checkpoint(clt, "clt")
    if model_path is not None:
        check_model_source(model_path)
    tc = load_clt(clt_path, device="cpu") if clt_path is not None else clt
    lm = (
        load_model(model_path, device=device, dtype=dtype, remote=remote, backend=backend)
        if model_path is not None
        else model
    )
    assert isinstance(lm, LoadedModel) and isinstance(tc, CrossLayerTranscoder)
    if clt_path is not None and not lm.remote:
        tc.to(device=lm.device)
    lm.check_clt(tc)
    # shapes can agree by chance (the toy Llama and GPT-2 do): the CLT's model_name must agree too
    check_model_name(tc.config.model_name, model_path or lm.name, clt_path or "(in memory)")
    return World(lm, tc, model_path, clt_path)
