"""A prune run's inputs, checked and accounted for before anything is computed or written.

- the pairs used: every pair of a ``--data`` file unless ``--n`` is given (never silently fewer);
- what the reference-behaviour flags did (``--target-token last``, ``--cut-corrupted``): the
  number of pairs each touched, printed and stored in ``config.json`` (``inputs``);
- the output folder: usable (a writable folder) and held by one writer at a time (per shard);
  a results file torn by a kill is repaired, keeping every finished row;
- where the checkpoints came from: hub ids with their resolved commit.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from pie_lib.data.pairs import Pair, load_pairs
from pie_lib.errors import DataFormatError, OutputPathError, ShapeMismatchError
from pie_lib.prune.defaults import DEFAULT_TASK_PAIRS  # noqa: E402,F401 (re-exported)
from pie_lib.prune.occurrences import TokenizedPairs


@dataclass
class InputReport:
    """What a run did with its pairs; stored as ``config.json["inputs"]``.

    Attributes:
        n_pairs: pairs used (per seed group); n_pairs_in_file: the data file's pairs (None: generated).
        target_token / n_last_token_targets: the target rule and the pairs whose multi-token
            target was reduced to its last token.
        cut_corrupted / n_cut_corrupted: whether longer corrupted prompts may be cut, and how many were.
        n_skipped: pairs skipped by ``--min-tokens``.
    """

    n_pairs: int = 0
    n_pairs_in_file: int | None = None
    target_token: str = "single"
    n_last_token_targets: int = 0
    cut_corrupted: bool = False
    n_cut_corrupted: int = 0
    n_skipped: int = 0
    skipped: dict[str, str] = field(default_factory=dict)

    def add(self, tok: TokenizedPairs) -> None:
        self.n_last_token_targets += tok.n_last_token_targets
        self.n_cut_corrupted += tok.n_cut_corrupted
        self.n_skipped += len(tok.skipped)
        self.skipped.update({str(k): v for k, v in list(tok.skipped.items())[:20]})

    def lines(self) -> list[str]:
        """What is printed about the flags that changed pairs (only those that did)."""
        out = []
        if self.target_token == "last":
            out.append(
                f"--target-token last: {self.n_last_token_targets} pair(s) had a multi-token target; "
                "its last token was used"
            )
        if self.cut_corrupted:
            out.append(f"--cut-corrupted: {self.n_cut_corrupted} corrupted prompt(s) were cut to the clean length")
        if self.n_skipped:
            out.append(f"--min-tokens: {self.n_skipped} pair(s) skipped as too short")
        return out

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def pairs_of_file(path: str, n: int | None, say: Callable[[str], None] = print) -> tuple[list[Pair], int]:
    """Every pair of ``path`` (or its first ``n``), with the count printed; (pairs, pairs in the file)."""
    pairs = load_pairs(path)
    total = len(pairs)
    if n is not None:
        if n > total:
            raise DataFormatError(
                f"--n {n}: {path} holds only {total} pair(s); pass --n {total} or less, "
                "or leave --n out to use every pair"
            )
        pairs = pairs[:n]
        say(f"using the first {n} of the {total} pairs of {path} (--n {n})")
    else:
        say(f"using all {total} pairs of {path}")
    return pairs, total


def check_distinct(tokenized: TokenizedPairs, pairs: list[Pair]) -> None:
    """With ``--corruption corrupted``, a pair whose two prompts are the same tokens has nothing to patch."""
    for b in tokenized.batches:
        same = (b.clean_ids == b.corr_ids).all(dim=1)
        if same.any():
            i = int(b.prompt_idx[same.nonzero()[0, 0]])
            p = pairs[i]
            where = f"{p.where}: pair {i}" if p.where else f"pair {i}"
            raise ShapeMismatchError(
                f"{where}: the clean and corrupted prompts are the same tokens, so every occurrence's effect is 0; "
                "give it a real corruption (or use --corruption zero)"
            )


def check_writable(out: str | os.PathLike) -> None:
    """``out`` (or the nearest folder above it that exists) accepts new files; probed, not guessed
    (permission bits say nothing for root, nor for read-only mounts)."""
    if not os.fspath(out).strip():
        raise OutputPathError("--out '' is empty; pass a folder for the results (it is created if missing)")
    out = Path(out)
    probe_dir = next((p for p in (out, *out.parents) if p.exists()), Path("."))
    if not probe_dir.is_dir():
        raise OutputPathError(f"--out {out}: {probe_dir} is a file, not a directory; pass another folder")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".pie-write-probe.", dir=probe_dir)
    except OSError as exc:
        raise OutputPathError(
            f"--out {out}: {probe_dir} is not writable ({exc.strerror or exc}); pass a folder you can write to"
        ) from None
    os.close(fd)
    os.unlink(tmp)


def checkpoint_sources(model: str, model_path: str, clt: str, clt_path: str) -> dict[str, Any]:
    """``{"model_source": {...}, "clt_source": {...}}``: hub ids with their resolved commit hash."""
    from pie_lib.provenance import checkpoint_source

    return {
        "model_source": checkpoint_source(model if model == model_path else model_path),
        "clt_source": checkpoint_source(clt if clt == clt_path else clt_path),
    }
