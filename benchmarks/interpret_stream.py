"""Stage II example collection on the toy corpus: streaming store against records store.

For ``--features`` CLT features of the toy world (default: every feature of every layer) and
``--docs`` documents of the toy corpus, time ``ActivationStore.build`` + ``select_examples`` in
records mode (every nonzero activation written) and in streaming mode (running top-N and a
reservoir per feature), each in a fresh folder, and report tokens per second, peak RSS growth over
the phase, and disk use. Top examples of both modes must agree (exit 1 otherwise).

Example::

    python benchmarks/interpret_stream.py --docs 2000 --json benchmarks/results/interpret_stream_toy.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from prune_speed import PeakMemory, hardware  # noqa: E402

from pie_lib.interpret.corpus import CorpusConfig  # noqa: E402
from pie_lib.interpret.examples import ActivationStore, ExampleConfig  # noqa: E402


def disk_bytes(root: Path) -> int:
    return sum(f.stat().st_size for f in root.rglob("*") if f.is_file())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="llama", help="toy world arch (llama / gpt2)")
    p.add_argument("--docs", type=int, default=2000, help="toy corpus documents")
    p.add_argument("--ctx-len", type=int, default=64)
    p.add_argument("--features", type=int, default=0, help="features per layer (0 = all)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--n-top", type=int, default=40)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work", type=Path, default=Path("/tmp/pie_interpret_stream"))
    p.add_argument("--modes", default="records,stream")
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    from pie_lib import toy
    from pie_lib.clt.io import load_clt
    from pie_lib.models.loading import load_model

    model = load_model(toy.toy_model_path(a.arch), device="cpu")
    clt = load_clt(toy.toy_clt_path(a.arch), device="cpu")
    per_layer = a.features or clt.n_features
    feats = [(l, f) for l in range(clt.n_layers) for f in range(per_layer)]
    corpus = CorpusConfig(source="toy", n_docs=a.docs, ctx_len=a.ctx_len)
    mem = PeakMemory("cpu")
    out: dict = {
        "arch": a.arch,
        "docs": a.docs,
        "ctx_len": a.ctx_len,
        "features": len(feats),
        "threads": a.threads,
        "hardware": hardware(),
        "modes": {},
    }
    tops = {}
    for mode in a.modes.split(","):
        root = a.work / mode
        if root.exists():
            shutil.rmtree(root)
        cfg = ExampleConfig(batch_size=a.batch_size, n_top=a.n_top, store=mode)
        # contexts first (tokenisation is the same for both modes and not what is compared)
        ActivationStore.build(model, clt, [], root, corpus, cfg, {"bench": a.arch}, progress=False)
        store = ActivationStore(root)
        n_tokens = int(store.contexts["token_ids"].map(len).sum())
        base_disk = disk_bytes(root)
        start = mem.reset()
        t0 = time.perf_counter()
        store = ActivationStore.build(model, clt, feats, root, corpus, cfg, {"bench": a.arch}, progress=False)
        t_collect = time.perf_counter() - t0
        ex = store.select_examples(feats, cfg)
        stats = store.feature_stats(feats)
        t_all = time.perf_counter() - t0
        peak = mem.peak_mb()
        top = ex[ex.kind == "top"]
        tops[mode] = top[["layer", "feature", "ctx"]].to_numpy()
        out["modes"][mode] = {
            "tokens": n_tokens,
            "contexts": store.n_contexts,
            "collect_seconds": t_collect,
            "total_seconds": t_all,
            "tokens_per_second": n_tokens / t_all,
            "peak_rss_mb": peak,
            "rss_growth_mb": peak - start,
            "disk_bytes": disk_bytes(root) - base_disk,
            "examples": len(ex),
            "mean_density": float(stats["density"].mean()),
        }
        m = out["modes"][mode]
        print(
            f"{mode:8s}: {n_tokens} tokens x {len(feats)} features in {t_all:.1f} s = {m['tokens_per_second']:.0f} tokens/s; "
            f"peak RSS {peak:.0f} MB (+{m['rss_growth_mb']:.0f}); disk {m['disk_bytes'] / 2**20:.1f} MiB; "
            f"mean density {m['mean_density']:.3f}",
            flush=True,
        )
    ok = True
    if len(tops) == 2:
        a_, b_ = tops.values()
        ok = a_.shape == b_.shape and bool((a_ == b_).all())
        out["top_examples_agree"] = ok
        print("top examples agree" if ok else "TOP EXAMPLES DIFFER between modes")
    out["loadavg_end"] = list(os.getloadavg())
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(
            json.dumps(out, indent=2, default=lambda x: x.item() if isinstance(x, np.generic) else str(x))
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
