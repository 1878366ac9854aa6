"""Load a served graph in headless Chromium: which nodes are on screen, and a screenshot.

Used by the browser test and by the paper's circuit figure. circuit-tracer's viewer page pulls its
JavaScript libraries from public CDNs (d3 + d3-jetpack, dagre, pako); machines without internet
get them from a local npm install instead (``make browser``: ``npm install`` into
:func:`viewer_js_dir`), and every CDN request of the page is answered from there. The viewer's own
files and the graph data still come from circuit-tracer's server.

Requirements (all optional for pie_lib itself): a Chromium binary (Debian: ``apt-get install
chromium``), the ``playwright`` Python package (driving that binary; no browser download), and the
npm libraries above.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from pie_lib.errors import MissingDependencyError

#: npm packages that stand in for the viewer's CDN scripts (versions the viewer asks for, or the
#: nearest npm release of a script that is not on npm).
NPM_PACKAGES = (
    "d3@7.9.0",
    "d3-collection@1.0.7",
    "d3-queue@3.0.7",
    "d3-request@1.0.6",
    "d3-jetpack@2.3.0",
    "dagre@0.8.5",
    "pako@2.1.0",
)
CHROMIUM_FLAGS = (
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
)


def viewer_js_dir() -> Path:
    """Where ``make browser`` installs the npm packages (env ``PIE_VIEWER_JS`` overrides)."""
    return Path(os.environ.get("PIE_VIEWER_JS", Path.home() / ".cache" / "pie_lib" / "viewer-js"))


def find_chromium() -> str | None:
    env = os.environ.get("PIE_CHROMIUM")
    if env:
        return env
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


def missing_requirements() -> list[str]:
    """What is absent for :func:`load_graph_page` (empty = it can run), each with its fix."""
    out = []
    if find_chromium() is None:
        out.append("no Chromium binary (apt-get install chromium, or set PIE_CHROMIUM)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        out.append("the playwright package (pip install playwright)")
    nm = viewer_js_dir() / "node_modules"
    absent = [p.split("@")[0] for p in NPM_PACKAGES if not (nm / p.rsplit("@", 1)[0]).exists()]
    if absent:
        out.append(f"viewer JS libraries {absent} in {nm} (make browser)")
    try:
        import circuit_tracer.frontend  # noqa: F401
    except ImportError:
        out.append("circuit-tracer's viewer (pip install --no-deps circuit-tracer==0.5.0)")
    return out


def _d3_bundle(nm: Path) -> str:
    """d3 v7 with the d3 v4-era modules d3-jetpack builds on, then d3-jetpack patching *that* d3.

    d3-jetpack's browser build replaces ``window.d3`` with an empty object, so it is evaluated as a
    CommonJS module whose every ``require`` returns the loaded d3. The transformer-circuits build of
    jetpack also gives ``d3.conventions(...)`` a ``drawAxis()`` method, which npm's lacks; added here.
    """
    parts = [
        (nm / p).read_text(encoding="utf-8")
        for p in (
            "d3/dist/d3.min.js",
            "d3-collection/dist/d3-collection.min.js",
            "d3-queue/build/d3-queue.min.js",
            "d3-request/build/d3-request.js",
        )
    ]
    jetpack = (nm / "d3-jetpack/build/d3-jetpack.cjs").read_text(encoding="utf-8")
    parts.append(
        "(function(){ var d3v7 = window.d3; var module = {exports: {}}; var exports = module.exports;"
        " var require = function(){ return d3v7; };\n" + jetpack + "\n;Object.assign(d3v7, module.exports);"
        " var conv = d3v7.conventions; d3v7.conventions = function(c){ c = conv(c);"
        " if (!c.drawAxis) c.drawAxis = function(){ return d3v7.drawAxis(c) }; return c }; })();"
    )
    return "\n;".join(parts)


def _cdn_scripts() -> dict[str, str]:
    """File name of each CDN script the viewer requests -> its local stand-in (empty = not needed)."""
    nm = viewer_js_dir() / "node_modules"
    return {
        "d3.js": _d3_bundle(nm),
        "jetpack_2024-07-20.js": "",  # folded into the d3 bundle
        "npy_v0.js": "",  # .npy files are not used by graph pages
        "hotserver-client-ws.js": "",  # live-reload of the viewer's developers
        "dagre.min.js": (nm / "dagre/dist/dagre.min.js").read_text(encoding="utf-8"),
        "pako.min.js": (nm / "pako/dist/pako.min.js").read_text(encoding="utf-8"),
    }


@dataclass
class PageReport:
    """What the page showed: link-graph node ids and whether each one's box lies inside the view."""

    node_ids: list[str]
    on_screen: dict[str, bool]
    errors: list[str]
    screenshot: Path | None
    detail_text: str = ""  # the feature panel's text (the clicked node's examples and logits)


def load_graph_page(
    url: str,
    screenshot: str | os.PathLike | None = None,
    timeout_s: float = 30.0,
    viewport: tuple[int, int] = (1400, 900),
) -> PageReport:
    """Open ``url`` (a served graph) in headless Chromium and read the link graph's nodes."""
    missing = missing_requirements()
    if missing:
        raise MissingDependencyError("cannot load the viewer in a browser: missing " + "; ".join(missing))
    import asyncio

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return _load(url, screenshot, timeout_s, viewport)
    # inside a running event loop (a Jupyter kernel) playwright's sync API refuses to start: use a thread
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(_load, url, screenshot, timeout_s, viewport).result()


def _load(url: str, screenshot: str | os.PathLike | None, timeout_s: float, viewport: tuple[int, int]) -> PageReport:
    from playwright.sync_api import sync_playwright

    scripts = _cdn_scripts()
    errors: list[str] = []

    def route(r) -> None:
        name = r.request.url.split("?")[0].rsplit("/", 1)[-1]
        if name in scripts:
            r.fulfill(status=200, body=scripts[name], content_type="application/javascript")
        else:  # anything else off this machine (fonts, the public feature CDN): refused, never fetched
            errors.append(f"blocked request {r.request.url}")
            r.abort()

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=find_chromium(), args=list(CHROMIUM_FLAGS), headless=True)
        try:
            page = browser.new_page(viewport={"width": viewport[0], "height": viewport[1]})
            page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
            page.route(
                "http*://**/*",
                lambda r: r.continue_() if r.request.url.startswith(url.split("/index")[0]) else route(r),
            )
            page.goto(url)
            page.wait_for_selector(".link-graph text.node", timeout=timeout_s * 1000)
            page.wait_for_timeout(500)  # let the layout settle
            if "clickedId=" in url:  # the clicked node's feature page loads asynchronously
                try:
                    page.wait_for_selector(".feature-example-list .ctx-container", timeout=5000)
                except Exception:  # no examples shown: the caller sees an empty / header-only detail_text
                    pass
            detail = page.evaluate("() => (document.querySelector('.feature-detail') || {}).innerText || ''")
            info = page.evaluate(
                "() => { const W = window.innerWidth, H = window.innerHeight;"
                " return Array.from(document.querySelectorAll('.link-graph text.node')).map(e => {"
                " const b = e.getBoundingClientRect();"
                " return [e.__data__ ? e.__data__.node_id : null, b.width > 0 && b.height > 0 && b.left >= 0 &&"
                " b.top >= 0 && b.right <= W && b.bottom <= H] }) }"
            )
            shot = None
            if screenshot is not None:
                shot = Path(screenshot)
                shot.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(shot))
        finally:
            browser.close()
    ids = [i for i, _ in info if i is not None]
    return PageReport(ids, {i: bool(v) for i, v in info if i is not None}, errors, shot, detail)
