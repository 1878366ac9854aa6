"""CLI flags derived from a config dataclass: one ``--flag`` per field, its type, choices, default and
help taken from the dataclass (its ``Attributes:`` docstring), and the config built back from the
parsed arguments -- so a field, its flag and the mapping between them are written once.

Derivation: ``int`` / ``float`` (also ``| None``) -> ``type=``; ``Literal[...]`` -> ``choices=``;
``list[int | float | str]`` -> a comma list; ``bool`` with default False -> ``store_true``; anything
else stays a string. A flag's ``dest`` is its own name (``--lambda-syn`` -> ``args.lambda_syn``).
Where a flag must differ from its field (a CLI default of None resolved later, a metavar), give
:class:`Flag` with the argparse keywords to override.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from pie_lib.cli.args import floats, ints, names

C = TypeVar("C")

_LISTS = {int: ints, float: floats, str: names}


@dataclass(frozen=True)
class Flag:
    """A field's flag name plus argparse keywords that override what is derived from the field."""

    name: str
    overrides: dict[str, Any] = field(default_factory=dict)


def flag(name: str, **overrides: Any) -> Flag:
    """``flag("--task", default=None)``: the flag ``--task``, its derived default replaced by None."""
    return Flag(name, overrides)


FieldFlags = Mapping[str, "str | Flag"]


def attribute_docs(cls: type) -> dict[str, str]:
    """``name -> text`` of the ``Attributes:`` section of ``cls``'s docstring (``a, b: text`` lines too)."""
    doc = (cls.__doc__ or "").split("Attributes:", 1)
    out: dict[str, str] = {}
    if len(doc) < 2:
        return out
    names_: list[str] = []
    for line in doc[1].splitlines():
        m = re.match(r"\s{4,8}([\w, ]+):\s+(.*)", line)
        if m and not line.startswith(" " * 12):
            names_ = [n.strip() for n in m.group(1).split(",")]
            for n in names_:
                out[n] = m.group(2).strip()
        elif line.strip() and names_:
            for n in names_:
                out[n] += " " + line.strip()
    return out


def _flag(spec: str | Flag) -> Flag:
    return spec if isinstance(spec, Flag) else Flag(spec)


def dest_of(spec: str | Flag) -> str:
    """The namespace attribute of a flag: ``--lambda-syn`` -> ``lambda_syn`` (argparse's own rule), or its ``dest=``."""
    fl = _flag(spec)
    return fl.overrides.get("dest") or fl.name.lstrip("-").replace("-", "_")


def _field_type(cls: type, f: dataclasses.Field) -> Any:
    """The evaluated annotation of one field (only the fields asked for: others may name torch types)."""
    if not isinstance(f.type, str):
        return f.type
    return eval(f.type, vars(sys.modules[cls.__module__]), {})  # noqa: S307 (our own annotations)


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    raise TypeError(f"field {f.name} has no default: it cannot become an optional flag")


def _derived(tp: Any, default: Any) -> dict[str, Any]:
    """argparse keywords (type / choices / action) for a field of type ``tp``."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    base = args[0] if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1 else tp
    if typing.get_origin(base) is Literal:
        return {"choices": list(typing.get_args(base))}
    if typing.get_origin(base) is list:
        (item,) = typing.get_args(base)
        return {"type": _LISTS[item]}
    if base is bool and default is False:
        return {"action": "store_true"}
    if base in (int, float):
        return {"type": base}
    return {}  # str fields stay strings


def add_config_flags(group: argparse._ActionsContainer, cls: type, fields: FieldFlags, help_prefix: str = "") -> None:
    """Add ``fields`` (``field name -> flag``) of ``cls`` as flags: type, choices, default and help from ``cls``."""
    by_name = {f.name: f for f in dataclasses.fields(cls)}
    docs = attribute_docs(cls)
    for name, spec in fields.items():
        fl = _flag(spec)
        f = by_name[name]
        kw: dict[str, Any] = {"default": _default(f)}
        kw.update(_derived(_field_type(cls, f), kw["default"]))
        kw.update({k: v for k, v in fl.overrides.items() if k != "dest"})
        text = docs.get(name, "").rstrip(".").replace("``", "")
        # None / an empty list: the field's text says what "not given" means
        quiet = kw.get("action") == "store_true" or kw["default"] is None or kw["default"] in ([], ())
        shown = "" if quiet else f" (default {_show(kw['default'])})"
        kw.setdefault("help", f"{help_prefix}{text}{shown}".replace("%", "%%"))
        group.add_argument(fl.name, dest=dest_of(fl), **kw)


def _show(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def config_values(args: argparse.Namespace, fields: FieldFlags) -> dict[str, Any]:
    """``field name -> parsed value`` of ``fields``."""
    return {name: getattr(args, dest_of(spec)) for name, spec in fields.items()}


def config_from_args(cls: type[C], args: argparse.Namespace, fields: FieldFlags, **extra: Any) -> C:
    """``cls`` built from the parsed ``fields`` (see :func:`add_config_flags`) and ``extra`` values."""
    return cls(**config_values(args, fields), **extra)
