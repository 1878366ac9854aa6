"""The ``pie`` command: ``pie prune``, ``pie interpret``, ``pie evaluate``, ``pie toy``.

Bad input ends in a non-zero exit with one line naming the problem and the fix (``PieError``);
``--traceback`` shows the full stack for debugging.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from typing import Callable, NoReturn, Sequence

from pie_lib.cli.evaluate import add_evaluate_parser
from pie_lib.cli.graph import add_graph_parser
from pie_lib.cli.interpret import add_interpret_parser
from pie_lib.cli.merge import add_merge_parser
from pie_lib.cli.methods import add_methods_parser
from pie_lib.cli.prune import add_prune_parser, quiet_progress
from pie_lib.cli.toy import add_toy_parser
from pie_lib.errors import PieError

#: One ``add_*_parser(subparsers)`` per command module, in ``pie --help`` order.
COMMANDS: tuple[Callable[[argparse._SubParsersAction], object], ...] = (
    add_prune_parser,
    add_merge_parser,
    add_interpret_parser,
    add_evaluate_parser,
    add_graph_parser,
    add_methods_parser,
    add_toy_parser,
)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump): ``pie prune: error: ... (see pie prune --help)``."""

    def parse_known_args(self, args=None, namespace=None):
        self._refuse_repeats(sys.argv[1:] if args is None else list(args))
        return super().parse_known_args(args, namespace)

    def _refuse_repeats(self, args: list[str]) -> None:
        """A flag given twice is ambiguous (argparse would silently keep the last one); repeatable
        flags (``--param``) are ``append`` actions and allowed. Stops at the sub-command's name:
        its own parser checks the rest."""
        commands = next((a.choices for a in self._actions if isinstance(a, argparse._SubParsersAction)), {})
        seen: dict[str, str] = {}
        for tok in args:
            if tok == "--" or tok in commands:
                break
            if not tok.startswith("--"):
                continue
            name = tok.split("=", 1)[0]
            action = self._option_string_actions.get(name)
            if action is None or isinstance(action, (argparse._AppendAction, argparse._HelpAction)):
                continue
            if action.dest in seen:
                self.error(f"{name} given twice ({seen[action.dest]} ... {tok}); give it once")
            seen[action.dest] = tok

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pie", description="PIE: Prune, Interpret, Evaluate on CLT features")
    parser.add_argument("--traceback", action="store_true", help="show full tracebacks on errors")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # reported by the sub-command's parser, so the line names it (pie prune: error: ...)
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        sub.choices[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    if not args.verbose:  # its retry warnings would break the one-line error of an unreachable hub id
        logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
    func: Callable[[argparse.Namespace], int] = args.func
    if getattr(args, "no_progress", False):
        quiet_progress()
    try:
        return int(func(args) or 0)
    except PieError as exc:
        if args.traceback:
            raise
        print(f"pie {args.command}: error: {_NEWLINES.sub(' ', str(exc).strip())}", file=sys.stderr)
        return 2
    except OSError as exc:  # missing / unreadable / not-a-folder paths, disk full ...
        if args.traceback:
            raise
        if _remote_failure(args, exc):
            return 2
        where = f": {exc.filename}" if exc.filename else ""
        print(f"pie {args.command}: error: {exc.strerror or _one_line(exc)}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"pie {args.command}: interrupted; finished rows are saved, rerun the same command to resume",
            file=sys.stderr,
        )
        return 130
    except Exception as exc:  # never a bare traceback: one line, the stack on request
        if args.traceback:
            raise
        if _remote_failure(args, exc):
            return 2
        from pie_lib.prune.patching import is_out_of_memory

        if is_out_of_memory(exc):
            print(
                f"pie {args.command}: error: out of memory ({_one_line(exc)}); lower --batch-size, use "
                "--dtype bfloat16, a larger device, or --remote",
                file=sys.stderr,
            )
            return 2
        print(
            f"pie {args.command}: internal error: {_one_line(exc)} (rerun with --traceback for the full stack)",
            file=sys.stderr,
        )
        return 1


def run(argv: Sequence[str] | None = None) -> NoReturn:
    """The ``pie`` console script and ``python -m pie_lib``: :func:`main`, then :func:`exit_now`."""
    exit_now(main(argv))


def exit_now(code: int) -> NoReturn:
    """End the process with ``code`` without the interpreter's teardown of its modules.

    With torch, transformers and nnsight imported, tearing the interpreter down (clearing ~3,000
    modules and collecting what they hold) costs ~0.9 s on one CPU thread -- a tenth of a toy-world
    ``pie prune``. Everything a command writes is closed by then (``with`` blocks, atomic writes), so
    this runs the ``atexit`` handlers (logging, weakref finalizers, temporary folders), flushes
    stdout / stderr and leaves with ``os._exit``. It exits normally instead while a non-daemon thread
    still runs (the interpreter must join it) or when torch was never imported (nothing to save).
    """
    import atexit
    import os
    import threading

    busy = any(t is not threading.main_thread() and t.is_alive() and not t.daemon for t in threading.enumerate())
    if busy or "torch" not in sys.modules:
        sys.exit(code)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or a broken pipe: nothing left to save
            pass
    os._exit(code)


_NEWLINES = re.compile(r"\s*\n\s*")


def _remote_failure(args: argparse.Namespace, exc: BaseException) -> bool:
    """With --remote: a request that never reached, or was refused by, the NDIF server gets one
    line naming the server and the fix (printed here; True when it was such a failure)."""
    if not getattr(args, "remote", False):
        return False
    from nnsight.intervention.backends.remote import RemoteError

    try:
        import httpx

        http: tuple[type, ...] = (httpx.HTTPError,)
    except ImportError:  # pragma: no cover - nnsight depends on httpx
        http = ()
    if not isinstance(exc, (RemoteError, ConnectionError, TimeoutError, *http)):
        return False
    from nnsight import CONFIG

    print(
        f"pie {args.command}: error: the NDIF server at {CONFIG.API.HOST} could not run the request "
        f"({_one_line(exc)}); check NDIF_HOST (nnsight.CONFIG.API.HOST) and your API key, or run without --remote",
        file=sys.stderr,
    )
    return True


def _one_line(exc: BaseException, limit: int = 300) -> str:
    """``Type: first line of the message``, cut to ``limit`` characters."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:limit]}" if lines else type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
