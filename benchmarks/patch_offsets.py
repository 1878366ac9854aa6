"""Sparse against dense patch offsets on one ``pie prune`` workload, bit for bit and in CPU seconds.

Runs ``pie prune`` once in-process (the arguments after ``--``), recording every
``PatchEvaluator.run`` call (and ``release_states``) of every batch, then replays those calls on
the same evaluators ``--repeats`` times each way, in turn: with sparse offsets
(``PatchEvaluator.sparse_offsets``, the default) and with them forced dense (it returning None, the
path every forward took before). Prints the CPU seconds (``time.process_time``) of each replay,
those of building the offsets (``_prepare_range``, the null's included) and whether every metric,
KL and argmax change is bitwise the same; ``--json`` writes them. The free memory the evaluators
see is pinned (8 GiB) so that both ways size chunks and kept states alike.

Example::

    python benchmarks/patch_offsets.py --repeats 5 --json out.json -- --model F/model --clt F/clt \\
        --data F/ioi.jsonl --methods fap,fap-synergy --k 5,10,20 --device cpu --out /tmp/po
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

import pie_lib.prune.patching as patching
from pie_lib.cli.app import main as pie_main


def _timed(acc: dict[str, float], name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.process_time()
        try:
            return fn(*args, **kwargs)
        finally:
            acc[name] += time.process_time() - t0

    return wrapper


def _same_bits(a: patching.PatchResult, b: patching.PatchResult) -> bool:
    return (
        torch.equal(a.metric.view(torch.int32), b.metric.view(torch.int32))
        and torch.equal(a.kl.view(torch.int32), b.kl.view(torch.int32))
        and torch.equal(a.pred_change, b.pred_change)
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=None)
    ap.add_argument("prune_args", nargs=argparse.REMAINDER, help="-- then the pie prune arguments")
    args = ap.parse_args(argv)
    prune_args = [a for a in args.prune_args if a != "--"]
    torch.set_num_threads(1)

    ev_cls = patching.PatchEvaluator
    real_run, real_release, real_sparse = ev_cls.run, ev_cls.release_states, ev_cls.sparse_offsets
    real_memory = patching.available_memory_bytes
    calls: list[tuple[Any, tuple | None, dict | None]] = []

    def record_run(self: Any, *a: Any, **k: Any) -> Any:
        calls.append((self, a, k))
        return real_run(self, *a, **k)

    def record_release(self: Any) -> None:
        calls.append((self, None, None))
        real_release(self)

    acc: dict[str, float] = {"prepare": 0.0}
    real_prepare = ev_cls._prepare_range
    try:
        patching.available_memory_bytes = lambda dev: 8 << 30
        ev_cls.run, ev_cls.release_states = record_run, record_release  # type: ignore[method-assign]
        try:
            rc = pie_main(["prune", *prune_args])
        except SystemExit as exc:
            rc = exc.code
        ev_cls.run, ev_cls.release_states = real_run, real_release  # type: ignore[method-assign]
        if rc:
            raise SystemExit(f"pie prune exited with {rc}")
        ev_cls._prepare_range = _timed(acc, "prepare", real_prepare)  # type: ignore[method-assign]
        evaluators = list({id(e): e for e, _, _ in calls}.values())
        times: dict[str, list[float]] = {"sparse": [], "dense": []}
        prepare: dict[str, list[float]] = {"sparse": [], "dense": []}
        outcomes: dict[str, list[patching.PatchResult]] = {}
        for _ in range(args.repeats):
            for mode in ("sparse", "dense"):
                ev_cls.sparse_offsets = real_sparse if mode == "sparse" else (lambda self, *a, **k: None)  # type: ignore[method-assign]
                for e in evaluators:  # each replay builds the null and the kept states afresh
                    e.release_states()
                    e._null = None
                acc["prepare"] = 0.0
                t0 = time.process_time()
                res = [e.run(*a, **(k or {})) if a is not None else e.release_states() for e, a, k in calls]
                times[mode].append(time.process_time() - t0)
                prepare[mode].append(acc["prepare"])
                outcomes[mode] = [r for r in res if r is not None]
    finally:
        ev_cls.run, ev_cls.release_states, ev_cls.sparse_offsets = real_run, real_release, real_sparse  # type: ignore[method-assign]
        ev_cls._prepare_range = real_prepare  # type: ignore[method-assign]
        patching.available_memory_bytes = real_memory
    same = all(_same_bits(a, b) for a, b in zip(outcomes["sparse"], outcomes["dense"]))
    result = {
        "run_calls": sum(a is not None for _, a, _ in calls),
        "evaluators": len(evaluators),
        "repeats": args.repeats,
        "bitwise_equal": same,
        **{f"{m}_cpu_s": times[m] for m in times},
        **{f"{m}_cpu_s_median": statistics.median(times[m]) for m in times},
        **{f"{m}_prepare_s_median": statistics.median(prepare[m]) for m in prepare},
    }
    print(f"{result['run_calls']} run() calls on {len(evaluators)} evaluators, replayed {args.repeats}x each way")
    for m in ("sparse", "dense"):
        print(
            f"{m:6s} patch CPU s: median {statistics.median(times[m]):.3f} (min {min(times[m]):.3f}); "
            f"offsets {statistics.median(prepare[m]):.3f}"
        )
    print(f"bitwise equal: {same}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=2)
    if not same:
        raise SystemExit("sparse and dense offsets gave different bits")
    return result


if __name__ == "__main__":
    main()
