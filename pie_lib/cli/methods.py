"""``pie methods``: list the circuit-discovery methods of the registry."""

from __future__ import annotations

import argparse


def add_methods_parser(sub: argparse._SubParsersAction) -> None:
    m = sub.add_parser("methods", help="list the circuit-discovery methods")
    m.set_defaults(func=_run_methods)


def _run_methods(a: argparse.Namespace) -> int:
    from pie_lib.prune.registry import load_plugins

    METHODS = load_plugins()
    for name in sorted(METHODS):
        m = METHODS[name]
        print(f"{name:22s} {'seeded' if m.seeded else '      '}  {m.description}")
    return 0
