"""What produced a result: library versions and checkpoint fingerprints, recorded with every run."""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import os
import re
from pathlib import Path

#: Files larger than this are fingerprinted by size + the sha256 of their first and last 4 MiB.
FULL_HASH_LIMIT = 256 * 1024 * 1024


def versions() -> dict[str, str]:
    """Versions of pie_lib and the libraries whose behaviour shapes the numbers."""
    out = {}
    for pkg in ("pie_lib", "torch", "nnsight", "transformers", "safetensors", "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def file_fingerprint(path: Path) -> str:
    """sha256 of the file, or ``partial-sha256:<size>:<hash of head+tail>`` for very large files."""
    size = path.stat().st_size
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        if size <= FULL_HASH_LIMIT:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
            return h.hexdigest()
        h.update(fh.read(4 << 20))
        fh.seek(size - (4 << 20))
        h.update(fh.read())
    return f"partial-sha256:{size}:{h.hexdigest()}"


def checkpoint_fingerprint(path_or_id: str | os.PathLike) -> str:
    """One hash over every weight/config file of a local checkpoint folder (or the id itself)."""
    p = Path(path_or_id)
    if not p.is_dir():
        return f"hub:{path_or_id}"
    h = hashlib.sha256()
    for f in sorted(p.rglob("*")):
        if f.is_file() and f.suffix in {".safetensors", ".json", ".yaml", ".bin", ".model", ".txt"}:
            h.update(f.relative_to(p).as_posix().encode())
            h.update(file_fingerprint(f).encode())
    return h.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    return file_fingerprint(Path(path))


_SHA = re.compile(r"[0-9a-f]{40}")
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


def is_hub_id(path_or_id: str | os.PathLike) -> bool:
    """``owner/name`` that is not a local path: a Hugging Face repo id."""
    s = str(path_or_id)
    return bool(_HUB_ID.fullmatch(s)) and not Path(s).expanduser().exists()


def hub_revision(repo_id: str, repo_type: str = "model", revision: str | None = None) -> str | None:
    """The commit hash a hub id resolves to (what a load of it now uses), or None if unknown.

    Read from the local Hugging Face cache (``refs/<revision>``, written by every download and
    used by offline loads); asked of the hub only when the cache has no such ref and the hub is
    not switched off (``HF_HUB_OFFLINE``). A 40-hex ``revision`` is returned as is.

    Args:
        repo_id: ``owner/name``; repo_type: "model" (models and CLTs) or "dataset";
        revision: branch, tag or commit (default "main").
    """
    revision = revision or "main"
    if _SHA.fullmatch(revision):
        return revision
    try:
        from huggingface_hub import constants
        from huggingface_hub.file_download import repo_folder_name
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        return None
    ref = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type=repo_type) / "refs" / revision
    try:
        sha = ref.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        sha = ""
    if _SHA.fullmatch(sha):
        return sha
    if constants.HF_HUB_OFFLINE:
        return None
    try:
        from huggingface_hub import HfApi

        sha = HfApi().repo_info(repo_id, repo_type=repo_type, revision=revision).sha
    except Exception:  # unreachable, gated, missing: the revision is simply unknown
        return None
    return sha if isinstance(sha, str) and _SHA.fullmatch(sha) else None


def revision_from_snapshot(path: str | os.PathLike) -> str | None:
    """``.../snapshots/<commit>/...`` (a hub download's folder) -> ``<commit>``; None otherwise."""
    parts = Path(path).parts
    for i, part in enumerate(parts[:-1]):
        if part == "snapshots" and _SHA.fullmatch(parts[i + 1]):
            return parts[i + 1]
    return None


def checkpoint_source(path_or_id: str | os.PathLike) -> dict[str, str | None]:
    """Where a checkpoint came from: ``{"id": ..., "revision": <commit> | None}`` for a hub id or a
    folder inside the HF cache; ``{"path": <absolute folder>, "revision": None}`` for a local folder."""
    p = Path(path_or_id).expanduser()
    if p.exists():
        return {"path": str(p.resolve()), "revision": revision_from_snapshot(p.resolve())}
    if is_hub_id(path_or_id):
        return {"id": str(path_or_id), "revision": hub_revision(str(path_or_id))}
    return {"path": str(path_or_id), "revision": None}


def hub_unreachable(kind: str, repo_id: str, exc: BaseException) -> str:
    """One line saying why a hub id's weights are not reachable, and what to do."""
    from huggingface_hub import constants

    text = f"{type(exc).__name__}: {exc}"
    offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    if offline or "offline" in text.lower():
        why = "the hub is switched off here (HF_HUB_OFFLINE=1) and the local Hugging Face cache holds no copy"
    elif any(s in text for s in ("RepositoryNotFound", "not a valid model identifier", "404", "401")):
        why = "no such repository on the hub (or it is private / gated: run `huggingface-cli login`)"
    elif "GatedRepo" in text or "403" in text:
        why = "the repository is gated: accept its licence on the hub and run `huggingface-cli login`"
    else:
        why = "the hub could not be reached and the local Hugging Face cache holds no copy"
    return (
        f"{kind} {repo_id!r}: weights not reachable -- {why}; download it where there is network "
        f"(huggingface-cli download {repo_id}) and pass the local folder, or set HF_HOME to a cache that holds it"
    )


def recorded_run(selections: str | os.PathLike) -> tuple[Path, dict] | None:
    """The ``config.json`` of the ``pie prune`` run that wrote ``selections`` (its folder, or the run
    folder above ``shards/shard-I-of-N/``), parsed; None when there is none (hand-made selections)."""
    import json

    sel = Path(selections)
    candidates = [sel.parent / "config.json"]
    if sel.parent.parent.name == "shards":
        candidates.append(sel.parent.parent.parent / "config.json")
    for path in candidates:
        if path.is_file():
            try:
                cfg = json.loads(path.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError):
                from pie_lib.errors import DataFormatError

                raise DataFormatError(
                    f"{path}: corrupt config of the run that wrote {sel.name}; "
                    "rerun `pie prune` or pass selections with a readable config.json"
                ) from None
            return (path, cfg) if isinstance(cfg, dict) else None
    return None


def check_same_world(
    selections: str | os.PathLike, model: str | os.PathLike | None, clt: str | os.PathLike | None
) -> None:
    """Refuse selections made with another model or CLT than the one given (by content hash).

    Args:
        selections: the ``selections.jsonl``; model, clt: what is about to be used (local folder or
            hub id; None = not checkable, e.g. an object built in memory).
    """
    from pie_lib.errors import ConfigMismatchError

    found = recorded_run(selections)
    if found is None:
        return
    path, rec = found
    for kind, now, key, where in (("model", model, "model_hash", "model_path"), ("CLT", clt, "clt_hash", "clt_path")):
        if now is None or not rec.get(key):
            continue
        if checkpoint_fingerprint(now) != rec[key]:
            made_with = rec.get(where) or rec.get("identity", {}).get(kind.lower(), "?")
            flag = "--model" if kind == "model" else "--clt"
            raise ConfigMismatchError(
                f"{selections} were made with {kind} {made_with} (recorded in {path}), not {now}; "
                f"pass {flag} {made_with}, or selections made with this {kind}"
            )


#: Where the embedded toy world lives (``pie_lib/toy/assets/<arch>/model``), without importing it.
_TOY_ASSETS = Path(__file__).resolve().parent / "toy" / "assets"


def model_name_of(model: str | os.PathLike) -> str | None:
    """The name a CLT's ``model_name`` would give this model: ``pie_lib.toy:<arch>`` for the toy
    world's folders, the id for a hub id; None for other local folders (not knowable)."""
    p = Path(model).expanduser()
    if p.exists():
        try:
            rel = p.resolve().relative_to(_TOY_ASSETS)
        except ValueError:
            return None
        return f"pie_lib.toy:{rel.parts[0]}" if len(rel.parts) == 2 and rel.parts[1] == "model" else None
    return str(model) if is_hub_id(model) else None


def check_model_name(clt_model_name: str | None, model: str | os.PathLike, clt: str | os.PathLike) -> None:
    """Refuse a CLT whose ``config.yaml`` names another model than the one loaded (when both are known).

    Shapes can agree by chance (the toy Llama and GPT-2 share d_model and depth); a CLT on the wrong
    model then runs and measures nothing. Local model folders outside the toy world carry no name,
    so they are not checked.
    """
    have = model_name_of(model)
    if not clt_model_name or have is None:
        return
    if clt_model_name.strip().lower() != have.lower():
        from pie_lib.errors import ShapeMismatchError

        toy = clt_model_name.startswith("pie_lib.toy:")
        fix = "toy:" + clt_model_name.split(":", 1)[1] if toy else clt_model_name

        raise ShapeMismatchError(
            f"CLT {clt} was trained for model {clt_model_name!r} (model_name in its config.yaml), not {have!r}; "
            f"pass --model {fix} or the CLT made for this model"
        )
