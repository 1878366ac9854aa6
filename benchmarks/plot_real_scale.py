"""Scaling figure and table from ``benchmarks/results/real_scale_<shape>_s<scale>_<device>.json``.

Seconds per prompt (all phases) and peak memory against model parameters, one line per shape,
one point per scale; prints a Markdown table with the per-phase breakdown.

Example::

    python benchmarks/plot_real_scale.py --results benchmarks/results --out figures/real_scale_scaling.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

PHASES = ["setup", "grad", "fap", "synergy", "select[fap-synergy]", "evaluate", "total"]


def load(results: Path, device: str) -> list[dict]:
    runs = [json.loads(p.read_text()) for p in sorted(results.glob(f"real_scale_*_{device}.json"))]
    return sorted(runs, key=lambda r: (r["shape"], -r["scale"]))


def table(runs: list[dict]) -> str:
    head = ["shape", "scale", "params", "CLT decoder values", "n", "seq/prompt", *PHASES, "peak RSS GB (GiB)"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in runs:
        s = r["seconds_per_prompt"]
        ms = r["model_shape"]
        rows.append(
            "| "
            + " | ".join(
                [
                    r["shape"],
                    str(r["scale"]),
                    f"{ms['params'] / 1e6:,.1f} M",
                    f"{ms['decoder_values'] / 1e9:.3g} G",
                    str(r["n"]),
                    f"{r.get('pie_sequences_per_prompt', float('nan')):.0f}",
                    *[f"{s.get(p, 0.0):.3g}" for p in PHASES],
                    f"{r['peak_memory_bytes'] / 1e9:.2f} ({r['peak_memory_bytes'] / 2**30:.2f})",
                ]
            )
            + " |"
        )
    return "\n".join(rows)


def reruns(results: Path, device: str) -> str:
    """Peak memory of each ``real_scale_<shape>_s<scale>_<device>_n<k>.json`` re-run (fewer prompts,
    same command otherwise) against the committed run's: the check that a re-run reproduces it."""
    rows = []
    for p in sorted(results.glob(f"real_scale_*_{device}_n*.json")):
        r = json.loads(p.read_text())
        main_json = results / f"real_scale_{r['shape']}_s{r['scale']}_{device}.json"
        if not main_json.exists():
            continue
        m = json.loads(main_json.read_text())
        a, b = m["peak_memory_bytes"], r["peak_memory_bytes"]
        phase = max(r["peak_memory_mb_by_phase"], key=r["peak_memory_mb_by_phase"].get)
        rows.append(
            f"| {r['shape']} | {r['scale']} | {m['n']}: {a / 2**30:.2f} GiB | {r['n']}: {b / 2**30:.2f} GiB "
            f"(set in {phase}) | {100 * (b - a) / a:+.1f}% |"
        )
    if not rows:
        return ""
    head = "| shape | scale | n: peak RSS | re-run n: peak RSS | difference |\n|---|---|---|---|---|"
    return head + "\n" + "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=None, help="PNG to write")
    a = p.parse_args(argv)
    runs = load(a.results, a.device)
    print(table(runs))
    again = reruns(a.results, a.device)
    if again:
        print("\n" + again)
    if a.out is None:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for shape in sorted({r["shape"] for r in runs}):
        rs = [r for r in runs if r["shape"] == shape]
        x = [r["model_shape"]["params"] for r in rs]
        ax1.plot(x, [r["seconds_per_prompt"]["total"] for r in rs], "o-", label=shape)
        ax2.plot(x, [r["peak_memory_bytes"] / 1e9 for r in rs], "o-", label=shape)
        for r, xi in zip(rs, x):
            ax1.annotate(f"/{r['scale']}", (xi, r["seconds_per_prompt"]["total"]), fontsize=7)
    ax2.axhline(10, color="grey", ls="--", lw=1, label="10 GB (issue 16's CPU bound)")
    for ax, title in ((ax1, "seconds per prompt (all phases)"), (ax2, "peak RSS (GB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("model parameters (random weights, scale /S of the real shape)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    dev = runs[0]["device"] if runs else a.device
    fig.suptitle(
        f"pie_lib prune stage at the paper's shapes, {dev}, {runs[0]['dtype'] if runs else ''}, 1 thread, "
        "2 shared cores",
        fontsize=9,
    )
    fig.tight_layout()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(a.out, dpi=120)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
