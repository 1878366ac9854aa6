"""``pie toy``: rebuild the embedded toy world."""

from __future__ import annotations

import argparse


def add_toy_parser(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("toy", help="rebuild the embedded toy world (python -m pie_lib.toy.build)")
    t.add_argument("rest", nargs=argparse.REMAINDER)
    t.set_defaults(func=_run_toy)


def _run_toy(a: argparse.Namespace) -> int:
    from pie_lib.toy import build

    return int(build.main(a.rest) or 0)
