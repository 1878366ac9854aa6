"""CLI flags derived from a config dataclass: one ``--flag`` per field, its type, default and help
taken from the dataclass (its ``Attributes:`` docstring), and the config built back from the
parsed arguments -- so a field, its flag and the mapping between them are written once."""

from __future__ import annotations

import argparse
import dataclasses
import re
import typing
from typing import Any, TypeVar

C = TypeVar("C")


def attribute_docs(cls: type) -> dict[str, str]:
    """``name -> text`` of the ``Attributes:`` section of ``cls``'s docstring (``a, b: text`` lines too)."""
    doc = (cls.__doc__ or "").split("Attributes:", 1)
    out: dict[str, str] = {}
    if len(doc) < 2:
        return out
    names: list[str] = []
    for line in doc[1].splitlines():
        m = re.match(r"\s{4,8}([\w, ]+):\s+(.*)", line)
        if m and not line.startswith(" " * 12):
            names = [n.strip() for n in m.group(1).split(",")]
            for n in names:
                out[n] = m.group(2).strip()
        elif line.strip() and names:
            for n in names:
                out[n] += " " + line.strip()
    return out


def add_config_flags(
    group: argparse._ActionsContainer, cls: type, fields: dict[str, str], help_prefix: str = ""
) -> None:
    """Add ``fields`` (``field name -> flag``) of ``cls`` as flags: type, default and help from ``cls``."""
    hints = typing.get_type_hints(cls)
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    docs = attribute_docs(cls)
    for name, flag in fields.items():
        tp = hints[name]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        base = args[0] if args else tp
        kind = base if base in (int, float) else None  # str fields stay strings
        text = docs.get(name, "").rstrip(".").replace("``", "")
        default = defaults[name]
        help_text = f"{help_prefix}{text} (default {default})"
        if kind is None:
            group.add_argument(flag, dest=name, default=default, help=help_text)
        else:
            group.add_argument(flag, dest=name, type=kind, default=default, help=help_text)


def config_from_args(cls: type[C], args: argparse.Namespace, fields: dict[str, str], **extra: Any) -> C:
    """``cls`` built from the parsed ``fields`` (see :func:`add_config_flags`) and ``extra`` values."""
    return cls(**{name: getattr(args, name) for name in fields}, **extra)
