"""``pie graph --serve DIR``: view graph files in circuit-tracer's own frontend and local server.

circuit-tracer 0.5.0 pins ``transformers<=4.57.3`` while pie_lib runs on transformers 5, but its
``frontend`` package (the pydantic schema, the HTML/JS viewer and ``local_server``) imports only
pydantic and the standard library. So pie_lib does not depend on it: install it next to pie_lib
with ``pip install --no-deps circuit-tracer==0.5.0`` (``make install`` does). We reuse its
request handler (``CircuitGraphHandler``: the viewer's files, ``/data/`` and ``/graph_data/`` from
the graph folder) and bind it to 127.0.0.1 only -- its ``serve()`` listens on every interface.

The viewer page loads d3, dagre and pako from public CDNs, so the browser needs the internet (the
headless tests serve local copies of those libraries instead; see :mod:`pie_lib.graph.browser`).
"""

from __future__ import annotations

import functools
import socketserver
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pie_lib.errors import DataFormatError, MissingDependencyError

INSTALL_HINT = "pip install --no-deps circuit-tracer==0.5.0"
DEFAULT_PORT = 8032


def _frontend() -> tuple[Any, Path]:
    try:
        from circuit_tracer.frontend.local_server import DEFAULT_FRONTEND_DIR, CircuitGraphHandler
    except ImportError:
        raise MissingDependencyError(
            "pie graph --serve uses circuit-tracer's viewer, which is not installed; install it with "
            f"`{INSTALL_HINT}` (--no-deps keeps your transformers: its frontend needs only the standard library)"
        ) from None
    return CircuitGraphHandler, Path(str(DEFAULT_FRONTEND_DIR))


class _LoopbackServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    allow_reuse_address = True
    daemon_threads = True


@dataclass
class RunningViewer:
    """A started viewer: ``url`` of its first graph, ``stop()`` to shut it down."""

    httpd: Any
    thread: threading.Thread
    url: str
    port: int

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


def check_graph_folder(folder: str | Path) -> list[str]:
    """The slugs listed in ``folder/graph-metadata.json``; a one-line error when it is not a graph folder."""
    import json

    path = Path(folder) / "graph-metadata.json"
    if not path.exists():
        raise DataFormatError(f"{path} is missing; pass the --out folder of `pie graph` to --serve")
    try:
        slugs = [g["slug"] for g in json.loads(path.read_text(encoding="utf-8"))["graphs"]]
    except (ValueError, KeyError, TypeError):
        raise DataFormatError(f"{path} is corrupt; rerun `pie graph` to rewrite it") from None
    if not slugs:
        raise DataFormatError(f"{path} lists no graphs; run `pie graph` first")
    return slugs


def start_viewer(folder: str | Path, port: int = DEFAULT_PORT, host: str = "127.0.0.1") -> RunningViewer:
    """Serve ``folder`` with circuit-tracer's handler on ``host:port`` (port 0 = any free port)."""
    slugs = check_graph_folder(folder)
    handler_cls, frontend = _frontend()
    handler = functools.partial(handler_cls, frontend_dir=frontend, data_dir=str(Path(folder).resolve()))
    try:
        httpd = _LoopbackServer((host, port), handler)
    except OSError as exc:
        raise MissingDependencyError(f"cannot listen on {host}:{port} ({exc.strerror}); pass another --port") from None
    real_port = httpd.server_address[1]
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    return RunningViewer(httpd, thread, f"http://{host}:{real_port}/index.html?slug={slugs[0]}", real_port)
