"""The paper's circuit figure: a served graph, photographed in headless Chromium (PNG + PDF)."""

from __future__ import annotations

import json
import os
from pathlib import Path


def circuit_screenshot(graph_dir: str | os.PathLike, slug: str, figures: str | os.PathLike, name: str) -> str:
    """Serve ``graph_dir``, open graph ``slug`` with its most influential kept occurrence clicked (so
    its links, feature page examples and logits show), and write ``figures/<name>.png`` and ``.pdf``.

    Returns a one-line account: what was written, or why nothing was (no browser set up -- the
    committed figure then stays as it is).
    """
    from pie_lib.graph.browser import load_graph_page, missing_requirements
    from pie_lib.graph.serve import start_viewer

    missing = missing_requirements()
    if missing:
        return "browser missing, figure not regenerated: " + "; ".join(missing) + " (make browser sets it up)"
    data = json.loads((Path(graph_dir) / f"{slug}.json").read_text(encoding="utf-8"))
    feats = [n for n in data["nodes"] if n["feature_type"] == "cross layer transcoder"]
    # the most influential kept occurrence: its links, examples and logits are shown
    target = (
        max(feats, key=lambda n: n.get("influence") or 0.0)["node_id"]
        if feats
        else next(n["node_id"] for n in data["nodes"] if n.get("is_target_logit"))
    )
    png = Path(figures) / f"{name}.png"
    viewer = start_viewer(Path(graph_dir), port=0)
    try:
        url = viewer.url.split("?")[0] + f"?slug={slug}&clickedId={target}"
        report = load_graph_page(url, screenshot=png, viewport=(1500, 950))
    finally:
        viewer.stop()
    import matplotlib.image as mpimg
    import matplotlib.pyplot as plt

    img = mpimg.imread(png)
    fig = plt.figure(figsize=(img.shape[1] / 150, img.shape[0] / 150), dpi=150)
    fig.figimage(img)
    fig.savefig(png.with_suffix(".pdf"))
    plt.close(fig)
    kept = sum(1 for n in data["nodes"] if n["feature_type"] == "cross layer transcoder")
    shown = sum(1 for i in report.node_ids if report.on_screen.get(i))
    return f"wrote {png} and {png.with_suffix('.pdf')}: {len(report.node_ids)} nodes drawn ({kept} kept occurrences), {shown} on screen"
