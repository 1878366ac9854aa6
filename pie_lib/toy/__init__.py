"""The embedded toy world: tiny Llama and GPT-2 LMs trained on a synthetic corpus, with CLTs.

Nothing here needs the network: the trained files ship in ``pie_lib/toy/assets`` and are rebuilt
deterministically by ``python -m pie_lib.toy.build``. Layout::

    assets/toy_world.json          accuracies, FVUs, L0s, sizes, seeds per arch
    assets/{arch}/model/           save_pretrained model (safetensors) + tokenizer
    assets/{arch}/clt/             JumpReLU CLT in circuit-tracer format
    assets/llama/feature_store/    the CLT's activation examples in the public feature-store format
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

from pie_lib.errors import WeightsUnavailableError

TOY_ROOT: Path = Path(__file__).resolve().parent / "assets"
ARCHS: tuple[str, ...] = ("llama", "gpt2")
SUMMARY_FILE = "toy_world.json"


def _check_arch(arch: str) -> str:
    if arch not in ARCHS:
        raise ValueError(f"unknown toy arch {arch!r}; valid archs are {', '.join(ARCHS)}")
    return arch


def toy_model_path(arch: str = "llama") -> Path:
    """Folder of the toy model + tokenizer (``AutoModelForCausalLM`` / ``AutoTokenizer`` load it)."""
    return TOY_ROOT / _check_arch(arch) / "model"


def toy_clt_path(arch: str = "llama") -> Path:
    """Folder of the toy model's CLT (``pie_lib.clt.load_clt`` loads it)."""
    return TOY_ROOT / _check_arch(arch) / "clt"


def toy_feature_store_path(arch: str = "llama") -> Path:
    """Folder of the toy CLT's feature store (``features/index.json.gz`` + per-layer records in the
    public stores' format; ``pie_lib.interpret.feature_store`` reads and writes it). Shipped for llama."""
    return TOY_ROOT / _check_arch(arch) / "feature_store"


def toy_arch(name: str | os.PathLike) -> str | None:
    """The toy arch a model / CLT name asks for: "llama" for "toy", "gpt2" for "toy:gpt2", None otherwise."""
    name = str(name)
    if name == "toy":
        return "llama"
    return name.split(":", 1)[1] if name.startswith("toy:") else None


def resolve_toy(name: str | os.PathLike, kind: Literal["model", "clt"]) -> str:
    """THE resolver of toy names: the toy world's ``kind`` folder for "toy" / "toy:<arch>", else ``name``.

    Whether the folder exists is not checked here (:func:`pie_lib.world.resolve_checkpoint` does).

    Raises:
        WeightsUnavailableError: "toy:<arch>" with an arch the toy world does not have.
    """
    arch = toy_arch(name)
    if arch is None:
        return str(name)
    if arch not in ARCHS:
        raise WeightsUnavailableError(
            f"unknown toy arch {arch!r} in --{kind} {name}; the toy world has {', '.join(ARCHS)} (e.g. toy:gpt2)"
        )
    return str(toy_model_path(arch) if kind == "model" else toy_clt_path(arch))


def toy_summary() -> dict:
    """The build's numbers (``assets/toy_world.json``): per arch accuracies, FVUs, L0s, seeds."""
    path = TOY_ROOT / SUMMARY_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; rebuild the toy world with `python -m pie_lib.toy.build`")
    return json.loads(path.read_text())


__all__ = [
    "ARCHS",
    "TOY_ROOT",
    "resolve_toy",
    "toy_arch",
    "toy_clt_path",
    "toy_feature_store_path",
    "toy_model_path",
    "toy_summary",
]
