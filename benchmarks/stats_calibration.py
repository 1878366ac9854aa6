"""Calibration of pie_lib.stats on simulated results tables with a known truth (issue 11).

Draws many synthetic tables -- 40 prompts, 3 seeds, either sharing their prompts or each seed with
its own -- runs the public ``paired_test`` / ``tost`` / ``summarize`` on each and prints (and writes
as JSON) the measured type-I error, TOST size at the margin, interval width with 1 vs 3 seeds and
coverage of the mean's interval on heavy-tailed KL, beside what treating every row as a unit gives.

    PYTHONPATH=$PWD python benchmarks/stats_calibration.py --tables 1000 --json runs/bench/stats_calibration.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats as sps

from pie_lib.stats import paired_test, summarize, tost

P, S = 40, 3


def table(a: np.ndarray, b: np.ndarray, shared: bool) -> pd.DataFrame:
    seed = np.repeat(np.arange(a.shape[0]), a.shape[1])
    pidx = np.tile(np.arange(a.shape[1]), a.shape[0])
    pid = np.array([f"p{i}" if shared else f"s{s}p{i}" for s, i in zip(seed, pidx)])
    n = seed.size
    return pd.DataFrame(
        {
            "method": ["A"] * n + ["B"] * n,
            "k": [50] * n + [75] * n,
            "seed": np.r_[seed, seed],
            "prompt_idx": np.r_[pidx, pidx],
            "prompt_id": np.r_[pid, pid],
            "kl": np.r_[a.ravel(), b.ravel()],
        }
    )


def draw(rng: np.random.Generator, n: int, shared: bool, diff: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """b: heavy-tailed KL (deterministic method: copies over seeds when shared); a = b + diff +
    per-prompt effect N(0, 0.3) + per-(seed, prompt) draw noise N(0, 0.1)."""
    shape = (n, 1, P) if shared else (n, S, P)
    u = np.broadcast_to(rng.lognormal(0, 0.8, shape), (n, S, P))
    w = np.broadcast_to(rng.normal(0, 0.3, shape), (n, S, P))
    return u + diff + w + rng.normal(0, 0.1, (n, S, P)), u


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tables", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write the results here as JSON")
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    n, res, t0 = args.tables, {}, time.perf_counter()
    for shared in (True, False):
        key = "shared" if shared else "seed_specific"
        a, b = draw(rng, n, shared)
        p = np.array([paired_test(table(a[t], b[t], shared), ("A", 50), ("B", 75), n_boot=200).p_t for t in range(n)])
        rows = sps.ttest_rel(a.reshape(n, -1), b.reshape(n, -1), axis=1).pvalue
        seed_t = sps.ttest_1samp((a - b).mean(axis=2), 0.0, axis=1).pvalue
        a_m, b_m = draw(rng, n, shared, diff=0.1)
        eq = np.array(
            [tost(table(a_m[t], b_m[t], shared), ("A", 50), ("B", 75), margin=0.1).equivalent for t in range(n)]
        )
        res[key] = {
            "type1_paired_test": float((p < 0.05).mean()),
            "type1_rows_as_units": float((rows < 0.05).mean()),
            "type1_seed_means_t": float((seed_t < 0.05).mean()),
            "tost_size_at_margin": float(eq.mean()),
        }
    # interval width: a deterministic method replicated over 3 seeds vs 1 seed, and coverage
    m = min(n, 300)
    x = rng.lognormal(0, 1.0, (m, P))
    truth = float(np.exp(0.5))
    w1, w3, cov, cov_pct = [], [], [], []
    for t in range(m):
        one = summarize(table(x[t][None], x[t][None], True).query("method == 'A'"), n_boot=1000).iloc[0]
        three = summarize(
            table(np.tile(x[t], (S, 1)), np.tile(x[t], (S, 1)), True).query("method == 'A'"), n_boot=1000
        ).iloc[0]
        w1.append(one["ci_high"] - one["ci_low"])
        w3.append(three["ci_high"] - three["ci_low"])
        cov.append(one["ci_low"] <= truth <= one["ci_high"])
        bm = rng.choice(x[t], size=(1000, P)).mean(axis=1)
        lo, hi = np.quantile(bm, [0.025, 0.975])
        cov_pct.append(lo <= truth <= hi)
    res["ci_width_ratio_3_vs_1_seeds"] = float(np.median(np.array(w3) / np.array(w1)))
    res["coverage_95_lognormal_sigma1_n40"] = {"bca": float(np.mean(cov)), "percentile": float(np.mean(cov_pct))}
    res["settings"] = {"tables": n, "prompts": P, "seeds": S, "seed": args.seed, "seconds": time.perf_counter() - t0}
    print(json.dumps(res, indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
