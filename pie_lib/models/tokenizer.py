"""A local model folder's tokenizer: the object ``AutoTokenizer.from_pretrained`` builds, with
nnsight's settings (EOS as pad when there is no pad token, left padding).

``from transformers import AutoTokenizer`` imports transformers' model registry (it walks every
model package's folder): ~0.3 s of a ``pie prune`` process, for a tokenizer built in ~5 ms. For a
native model folder whose ``tokenizer_config.json`` names the generic fast class
(``PreTrainedTokenizerFast`` / ``TokenizersBackend``, as the toy models and Llama-3's do), and no
custom code (``auto_map``), AutoTokenizer's resolution ends in
``TokenizersBackend.from_pretrained(folder, _from_auto=True, revision=..., _commit_hash=...)`` for
the model types listed in :data:`DIRECT_MODEL_TYPES` (none of them is in transformers' table of
hub classes it overrides, nor Mistral's). That call is made here directly, with the same
arguments, so the result is the same object; anything else goes through AutoTokenizer as before.
``tests/test_tokenizer_load.py`` pins both (the tables and the objects built both ways).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

#: tokenizer_config.json classes AutoTokenizer resolves to ``TokenizersBackend`` itself
GENERIC_CLASSES = ("PreTrainedTokenizerFast", "TokenizersBackend")
#: config.json model types (the native backend's) for which it does so
DIRECT_MODEL_TYPES = ("gpt2", "llama", "gemma2")


def load_tokenizer(folder: str, config: Any = None) -> Any:
    """The folder's tokenizer with nnsight's settings.

    ``config``: the model's config, when already read (AutoTokenizer reads only its ``model_type``
    and ``tokenizer_class``; without one it builds transformers' config class). The direct build
    needs it (its ``model_type`` decides the class).
    """
    tok = _generic_fast(folder, config)
    if tok is None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(folder, **({"config": config} if config is not None else {}))
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def direct_arguments(folder: str, config: Any) -> dict[str, Any] | None:
    """The keyword arguments AutoTokenizer passes to ``TokenizersBackend.from_pretrained`` for this
    folder, or None when its choice of class is not known to be ``TokenizersBackend``."""
    if config is None or getattr(config, "model_type", None) not in DIRECT_MODEL_TYPES:
        return None
    if getattr(config, "tokenizer_class", None) is not None:  # AutoTokenizer may read it: leave it to it
        return None
    path = Path(folder) / "tokenizer_config.json"
    if not Path(folder).is_dir() or not path.is_file():
        return None
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # AutoTokenizer reports it
    if not isinstance(values, dict) or "auto_map" in values or values.get("tokenizer_class") not in GENERIC_CLASSES:
        return None
    from transformers.utils.hub import resolve_revision

    return {"_from_auto": True, "revision": resolve_revision(folder, None), "_commit_hash": values.get("_commit_hash")}


def _generic_fast(folder: str, config: Any) -> Any:
    kwargs = direct_arguments(folder, config)
    if kwargs is None:
        return None
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    return TokenizersBackend.from_pretrained(folder, **kwargs)
