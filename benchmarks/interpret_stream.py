"""Stage II example collection on the toy corpus: the streaming store (default) against records.

For ``--features`` CLT features of the toy world (default: every feature of every layer) and
``--docs`` documents of the toy corpus, time ``ActivationStore.build`` + ``select_examples`` +
``feature_stats`` in each mode (stream: the default ``ExampleConfig``, bounded state; records:
every nonzero activation written), each in a fresh folder, then what ``pie evaluate`` reads
(``natural_acts`` of every feature, timed apart). Reports tokens per second, peak RSS growth over
the collection phase, disk use (without the shared ``contexts.parquet``) and the state's size;
also CPU seconds (``time.process_time``), the steadier figure on a shared machine.
Top examples of both modes must agree (exit 1 otherwise).

Example::

    python benchmarks/interpret_stream.py --docs 2000 --json benchmarks/results/interpret_stream_toy_d2000.json
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


def compare_draws(exact: list, stream: list, seeds: int = 4) -> dict:
    """FADE and pie draws from each feature's exact activations against those from the streaming
    store's held contexts (the same seeds, one stream per feature): silent contexts drawn, median activation of the active
    ones drawn, share of active contexts among the pie protocol's random draws; means over features."""
    from pie_lib.evaluate.sampling import fade_sample, fade_sample_weighted, pie_sample, pie_sample_held

    rows = []
    for i, (ex, st) in enumerate(zip(exact, stream)):
        for s in range(seeds):
            seed = [s, i]  # per feature, as pie evaluate seeds its draws
            a = ex.acts[fade_sample(ex.acts, rng=np.random.default_rng(seed))]
            b = st.acts[fade_sample_weighted(st.acts, st.weight, rng=np.random.default_rng(seed))]

            def randoms(acts: np.ndarray, seed: list[int]) -> np.ndarray:  # pie_sample's random part
                top = np.argsort(-np.abs(acts), kind="mergesort")[:10]
                return acts[np.setdiff1d(pie_sample(acts, rng=np.random.default_rng(seed)), top)]

            ra = randoms(ex.acts, seed)
            if st.exact:
                rb = randoms(st.acts, seed)
            else:
                _, r = pie_sample_held(st.acts, st.pos, st.n_top_exact, st.uniform_pos, rng=np.random.default_rng(seed))
                rb = st.uniform_acts[r]
            rows.append(
                [
                    (a == 0).sum(),
                    (b == 0).sum(),
                    np.median(a[a != 0]) if (a != 0).any() else np.nan,
                    np.median(b[b != 0]) if (b != 0).any() else np.nan,
                    (ra != 0).mean(),
                    (rb != 0).mean(),
                ]
            )
    m = np.nanmean(np.asarray(rows, dtype=np.float64), axis=0)
    names = ["silent_exact", "silent_stream", "median_active_exact", "median_active_stream"]
    names += ["pie_random_active_exact", "pie_random_active_stream"]
    return {n: float(v) for n, v in zip(names, m)}


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
    p.add_argument("--modes", default="stream,records")
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
    natural: dict = {}
    for mode in a.modes.split(","):
        root = a.work / mode
        if root.exists():
            shutil.rmtree(root)
        cfg = ExampleConfig(batch_size=a.batch_size, n_top=a.n_top, store=mode)  # the defaults otherwise
        # contexts first (tokenisation is the same for both modes and not what is compared)
        ActivationStore.build(model, clt, [], root, corpus, cfg, {"bench": a.arch}, progress=False)
        store = ActivationStore(root)
        n_tokens = int(store.contexts["token_ids"].map(len).sum())
        base_disk = disk_bytes(root)
        start = mem.reset()
        t0, c0 = time.perf_counter(), time.process_time()
        store = ActivationStore.build(model, clt, feats, root, corpus, cfg, {"bench": a.arch}, progress=False)
        t_collect = time.perf_counter() - t0
        ex = store.select_examples(feats, cfg)
        stats = store.feature_stats(feats)
        t_all = time.perf_counter() - t0
        c_all = time.process_time() - c0  # CPU time: what a shared machine's load does not inflate
        peak = mem.peak_mb()
        t1 = time.perf_counter()
        nats = [store.natural_acts(*f) for f in feats]  # what pie evaluate samples from
        t_nat = time.perf_counter() - t1
        top = ex[ex.kind == "top"]
        tops[mode] = top[["layer", "feature", "ctx"]].to_numpy()
        natural[mode] = nats
        out["modes"][mode] = {
            "tokens": n_tokens,
            "contexts": store.n_contexts,
            "collect_seconds": t_collect,
            "total_seconds": t_all,
            "tokens_per_second": n_tokens / t_all,
            "cpu_seconds": c_all,
            "tokens_per_cpu_second": n_tokens / c_all,
            "peak_rss_mb": peak,
            "rss_growth_mb": peak - start,
            "disk_bytes": disk_bytes(root) - base_disk,
            "examples": len(ex),
            "mean_density": float(stats["density"].mean()),
            "natural_acts_seconds": t_nat,
            "natural_sampling_exact": int(sum(n.exact for n in nats)),
            "natural_held_contexts_mean": float(np.mean([len(n.pos) for n in nats])),
            "config": {k: v for k, v in vars(cfg).items()},
        }
        if mode == "stream":
            from pie_lib.interpret.examples import StreamingExamples

            states = [StreamingExamples.load(f) for f in root.glob("rounds/*/stream.npz")]
            out["modes"][mode]["state_bytes"] = int(sum(st.nbytes for st in states))
        m = out["modes"][mode]
        print(
            f"{mode:8s}: {n_tokens} tokens x {len(feats)} features in {t_all:.1f} s = {m['tokens_per_second']:.0f} tokens/s "
            f"({c_all:.1f} CPU s = {m['tokens_per_cpu_second']:.0f} tokens/CPU-s); "
            f"peak RSS {peak:.0f} MB (+{m['rss_growth_mb']:.0f}); disk {m['disk_bytes'] / 2**20:.1f} MiB; "
            f"mean density {m['mean_density']:.3f}; natural_acts of every feature {t_nat:.1f} s "
            f"({m['natural_sampling_exact']} of {len(feats)} exact)",
            flush=True,
        )
    ok = True
    if len(tops) == 2:
        a_, b_ = tops.values()
        ok = a_.shape == b_.shape and bool((a_ == b_).all())
        out["top_examples_agree"] = ok
        print("top examples agree" if ok else "TOP EXAMPLES DIFFER between modes")
    if {"stream", "records"} <= set(natural):
        out["fade_draws"] = compare_draws(natural["records"], natural["stream"])
        f = out["fade_draws"]
        print(
            f"FADE draws (500 per feature), exact (records) vs from the stream store: silent contexts "
            f"{f['silent_exact']:.1f} vs {f['silent_stream']:.1f}; active ones' median activation "
            f"{f['median_active_exact']:.3f} vs {f['median_active_stream']:.3f}; pie random draws active "
            f"{f['pie_random_active_exact']:.2f} vs {f['pie_random_active_stream']:.2f} (means over features)"
        )
    out["loadavg_end"] = list(os.getloadavg())
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(
            json.dumps(out, indent=2, default=lambda x: x.item() if isinstance(x, np.generic) else str(x))
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
