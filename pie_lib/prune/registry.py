"""The method registry: a name on the command line -> how to score and select a K-circuit.

A leaf module: it imports no method. Methods live in plugin modules (:data:`PLUGINS`) that call
:func:`register_method` when imported; :func:`get_methods` imports them on first use, so
``pie prune --methods`` and the sweep store see one list. A name registered twice is refused.

Each method maps (batch context, K, seed, params) to a keep mask ``[N]`` and the per-occurrence
scores recorded with the selection.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from pie_lib.errors import BudgetError

if TYPE_CHECKING:
    import torch

    from pie_lib.prune.context import BatchContext
    from pie_lib.prune.params import MethodParams
    from pie_lib.prune.select import Budget

#: Modules whose import registers methods: the paper's methods, the related methods, the methods beyond the paper.
PLUGINS: tuple[str, ...] = ("pie_lib.prune.methods", "pie_lib.prune.related", "pie_lib.prune.beyond")

Selector = Callable[["BatchContext", "Budget", int, "MethodParams"], "tuple[torch.Tensor, torch.Tensor]"]
#: (batch context, every budget about to be selected, seed, params): pays for their shared work at once
Prefetcher = Callable[["BatchContext", "list[Budget]", int, "MethodParams"], None]


@dataclass(frozen=True)
class Method:
    """A circuit-discovery method. ``seeded``: its selection depends on the seed.

    ``prefetch`` (optional): called with all the budgets of a batch before they are selected one by
    one, so a method can batch the forwards they share (it must not change what ``select`` returns).
    """

    name: str
    select: Selector
    seeded: bool
    description: str
    prefetch: Prefetcher | None = None


METHODS: dict[str, Method] = {}


def register_method(
    name: str, select: Selector, seeded: bool, description: str, prefetch: Prefetcher | None = None
) -> None:
    """Add a method; a name that is already registered is refused (two plugins would shadow each other)."""
    if name in METHODS:
        raise ValueError(f"method {name!r} is already registered ({METHODS[name].description!r}); pick another name")
    METHODS[name] = Method(name, select, seeded, description, prefetch)


def load_plugins() -> dict[str, Method]:
    """Import every plugin module (each registers its methods once) and return the registry."""
    for module in PLUGINS:
        importlib.import_module(module)
    return METHODS


def get_methods(names: list[str] | str) -> list[Method]:
    """Resolve a comma list of names; unknown, empty or duplicate lists are clear errors."""
    load_plugins()
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    if not names:
        raise BudgetError(f"no methods given; choose from {sorted(METHODS)}")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise BudgetError(f"method(s) {dup} listed twice; list each method once")
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise BudgetError(f"unknown method(s) {unknown}; choose from {sorted(METHODS)}")
    return [METHODS[n] for n in names]
