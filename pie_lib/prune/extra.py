"""``MethodParams.extra`` (``pie prune --param KEY=VALUE``) -> a plugin's typed config dataclass.

Each plugin (related methods, methods beyond the paper) owns a key prefix per config class and
a value converter; the parsing and the error messages are here, once.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Callable, TypeVar

from pie_lib.errors import BudgetError

C = TypeVar("C")


def build_from_extra(cls: type[C], extra: dict | None, prefix: str, convert: Callable[[Any, Any, str], Any]) -> C:
    """Build ``cls`` from the keys of ``extra`` that carry ``prefix`` (other keys are ignored).

    Args:
        convert: ``(value, field type, key) -> value`` (raises TypeError / ValueError / BudgetError).
    Raises:
        BudgetError: a key with this prefix that names no field, or a value of the wrong type.
    """
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kwargs = {}
    for key, value in (extra or {}).items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix) :]
        if name not in names:
            valid = ", ".join(prefix + n for n in sorted(names))
            raise BudgetError(f"unknown parameter {key!r}; valid keys: {valid}")
        try:
            kwargs[name] = convert(value, hints[name], key)
        except (TypeError, ValueError):
            tp = hints[name]
            raise BudgetError(f"parameter {key}={value!r} is not a valid {getattr(tp, '__name__', tp)}") from None
    return cls(**kwargs)


#: The configs the loaded plugins read from ``extra``: prefix -> (config class, value converter);
#: each plugin's config module registers its own at import.
KNOWN: dict[str, tuple[type, Callable[[Any, Any, str], Any]]] = {}


def register_configs(prefixes: dict[type, str], convert: Callable[[Any, Any, str], Any]) -> None:
    """Declare a plugin's ``--param`` configs (class -> key prefix) and its value converter."""
    KNOWN.update({prefix: (cls, convert) for cls, prefix in prefixes.items()})


def check_extra(extra: dict | None) -> None:
    """Every ``--param`` key must be read by some plugin, with a valid value -- checked before the
    run, whatever methods are selected: a typo would otherwise silently run the defaults."""
    unknown = sorted(k for k in (extra or {}) if not any(k.startswith(p) for p in KNOWN))
    if unknown:
        raise BudgetError(
            f"--param {unknown}: no method reads {'this key' if len(unknown) == 1 else 'these keys'}; known "
            f"prefixes: {', '.join(sorted(KNOWN))} (see pie_lib/prune/related/config.py, beyond/config.py)"
        )
    for prefix, (cls, convert) in KNOWN.items():
        build_from_extra(cls, extra, prefix, convert)
