"""The native loader's tokenizer (:mod:`pie_lib.models.tokenizer`) is the one AutoTokenizer builds.

The direct build skips ``from transformers import AutoTokenizer`` (~0.3 s of import) only where
AutoTokenizer would call ``TokenizersBackend.from_pretrained`` itself; these tests spy on that call
to show both paths make it with the same arguments, compare the objects built, and pin
transformers' tables the shortcut relies on.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast
from transformers.models.auto import tokenization_auto
from transformers.tokenization_utils_tokenizers import TokenizersBackend

from pie_lib.models.native.config import native_config
from pie_lib.models.random_init import word_tokenizer
from pie_lib.models.tokenizer import DIRECT_MODEL_TYPES, GENERIC_CLASSES, direct_arguments, load_tokenizer
from pie_lib.toy import toy_model_path

TEXTS = [
    "",
    " ",
    "When Mary and John went to the store, John gave a drink to",
    "  two  spaces\tand a tab\nnewline",
    "héllo wörld ñ 日本語 😀",
    "<|endoftext|>",
    "a<|endoftext|>b <|endoftext|> c",
    "<|begin_of_text|>x<|end_of_text|>",
    "<bos> w1 <pad> w2 <unk> w3",
    "w1 w2 w3 w39",
    " w5",
    "def f(x):\n    return x  # comment",
]


def _byte_level_bpe(specials: list[str]) -> Tokenizer:
    """A GPT-2-style byte-level BPE trained on a few sentences, with ``specials`` as special tokens."""
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    t.train_from_iterator([TEXTS[2], TEXTS[3], TEXTS[4], TEXTS[11]] * 3, trainer)
    return t


def _gpt2_style(folder: Path) -> None:
    """GPT-2's layout: <|endoftext|> as BOS, EOS and UNK, no post-processor, no pad token."""
    tok = PreTrainedTokenizerFast(
        tokenizer_object=_byte_level_bpe(["<|endoftext|>"]),
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    tok.save_pretrained(str(folder))


def _llama3_style(folder: Path, add_bos: bool | None) -> None:
    """Llama-3's layout: a template post-processor prepending <|begin_of_text|>, an EOS, extra
    reserved special tokens, ``add_bos_token`` set or not."""
    t = _byte_level_bpe(["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_0|>"])
    bos = t.token_to_id("<|begin_of_text|>")
    t.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A",
        pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", bos)],
    )
    kw = {} if add_bos is None else {"add_bos_token": add_bos}
    tok = PreTrainedTokenizerFast(
        tokenizer_object=t,
        bos_token="<|begin_of_text|>",
        eos_token="<|end_of_text|>",
        clean_up_tokenization_spaces=True,
        model_max_length=131072,
        extra_special_tokens=["<|reserved_0|>"],
        **kw,
    )
    tok.save_pretrained(str(folder))


def _word_level(folder: Path) -> None:
    word_tokenizer([f"w{i}" for i in range(40)]).save_pretrained(str(folder))


def _set_config(folder: Path, **changes) -> None:
    path = folder / "tokenizer_config.json"
    values = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            values.pop(key, None)
        else:
            values[key] = value
    path.write_text(json.dumps(values))


def _folder(tmp_path: Path, layout: str, cls: str) -> Path:
    folder = tmp_path / f"{layout}-{cls}"
    folder.mkdir()
    if layout == "gpt2-bpe":
        _gpt2_style(folder)
    elif layout.startswith("llama3"):
        _llama3_style(folder, {"llama3": None, "llama3-bos": True, "llama3-nobos": False}[layout])
    elif layout == "word":
        _word_level(folder)
    else:  # the shipped toy models' own folders
        for f in toy_model_path(layout.removeprefix("toy-")).glob("tokenizer*"):
            (folder / f.name).write_bytes(f.read_bytes())
    _set_config(folder, tokenizer_class=cls)
    return folder


def _config(model_type: str):
    cfg = native_config({"model_type": model_type})
    assert cfg is not None and cfg.__dict__["model_type"] == model_type
    return cfg


def _auto(folder: Path, config) -> object:
    """What the native loader built before: AutoTokenizer, then nnsight's settings."""
    tok = AutoTokenizer.from_pretrained(str(folder), config=config)
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def _same(a, b) -> None:
    assert type(a) is type(b)
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()
    assert a.init_kwargs == b.init_kwargs
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "padding_side", "model_max_length"):
        assert getattr(a, attr) == getattr(b, attr), attr
    assert a.all_special_tokens == b.all_special_tokens
    assert a.get_vocab() == b.get_vocab() and len(a) == len(b)
    for text in TEXTS:
        ids = a(text)["input_ids"]
        assert ids == b(text)["input_ids"], text
        assert a(text, add_special_tokens=False)["input_ids"] == b(text, add_special_tokens=False)["input_ids"], text
        assert a.decode(ids) == b.decode(ids) and a.decode(ids, skip_special_tokens=True) == b.decode(
            ids, skip_special_tokens=True
        )
        assert [a.decode([t]) for t in ids] == [b.decode([t]) for t in ids]
    batch_a = a(TEXTS[1:5], padding=True, return_tensors="pt")
    batch_b = b(TEXTS[1:5], padding=True, return_tensors="pt")
    assert batch_a["input_ids"].tolist() == batch_b["input_ids"].tolist()
    assert batch_a["attention_mask"].tolist() == batch_b["attention_mask"].tolist()


LAYOUTS = ["gpt2-bpe", "llama3", "llama3-bos", "llama3-nobos", "word", "toy-gpt2", "toy-llama"]


@pytest.mark.parametrize("model_type", DIRECT_MODEL_TYPES)
@pytest.mark.parametrize("cls", GENERIC_CLASSES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_direct_build_is_autotokenizers(tmp_path, monkeypatch, layout, cls, model_type):
    folder = _folder(tmp_path, layout, cls)
    config = _config(model_type)
    calls = []
    original = TokenizersBackend.from_pretrained.__func__  # pyright: ignore[reportFunctionMemberAccess]

    def spy(klass, *args, **kwargs):
        calls.append((klass, args, kwargs))
        return original(klass, *args, **kwargs)

    monkeypatch.setattr(TokenizersBackend, "from_pretrained", classmethod(spy))
    want = _auto(folder, config)
    got = load_tokenizer(str(folder), config=config)
    assert len(calls) == 2 and calls[0] == calls[1], calls  # AutoTokenizer made the very call made directly
    assert direct_arguments(str(folder), config) == calls[1][2]
    _same(got, want)


def test_commit_hash_is_passed_as_autotokenizer_does(tmp_path):
    folder = _folder(tmp_path, "word", "PreTrainedTokenizerFast")
    _set_config(folder, _commit_hash="0123abcd")
    assert direct_arguments(str(folder), _config("gpt2")) == {
        "_from_auto": True,
        "revision": None,
        "_commit_hash": "0123abcd",
    }


def test_other_folders_go_through_autotokenizer(tmp_path, monkeypatch):
    """A named tokenizer class, custom code, a missing or broken tokenizer_config.json, a model type
    not pinned here, or no config: no direct build (AutoTokenizer decides, as before)."""
    base = _folder(tmp_path, "word", "PreTrainedTokenizerFast")
    gpt2 = _config("gpt2")
    assert direct_arguments(str(base), gpt2) is not None
    assert direct_arguments(str(base), None) is None
    other = _config("gpt2")
    other.__dict__["model_type"] = "qwen2"
    assert direct_arguments(str(base), other) is None
    named = _config("llama")
    named.__dict__["tokenizer_class"] = "LlamaTokenizer"
    assert direct_arguments(str(base), named) is None
    for changes in (
        {"tokenizer_class": "GPT2Tokenizer"},
        {"tokenizer_class": None},
        {"auto_map": {"AutoTokenizer": ["x.T", None]}},
    ):
        folder = tmp_path / f"f{abs(hash(json.dumps(changes)))}"
        folder.mkdir()
        for f in base.iterdir():
            (folder / f.name).write_bytes(f.read_bytes())
        _set_config(folder, **changes)
        assert direct_arguments(str(folder), gpt2) is None, changes
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "tokenizer_config.json").write_text("{not json")
    assert direct_arguments(str(tmp_path / "broken"), gpt2) is None
    assert direct_arguments(str(tmp_path / "missing"), gpt2) is None

    called = []
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", lambda *a, **k: called.append(a) or word_tokenizer(["x"]))
    tok = load_tokenizer(str(base), config=None)
    assert called and tok.padding_side == "left"


def test_transformers_tables_the_shortcut_relies_on():
    """For the direct model types AutoTokenizer keeps a generic hub class: none is in the table of
    hub classes it overrides, and none maps to Mistral's backend (transformers upgrades re-check this)."""
    for model_type in DIRECT_MODEL_TYPES:
        assert model_type not in tokenization_auto.MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS, model_type
        assert "Mistral" not in str(tokenization_auto.TOKENIZER_MAPPING_NAMES.get(model_type)), model_type
    for cls in GENERIC_CLASSES:
        assert tokenization_auto.tokenizer_class_from_name(cls) is TokenizersBackend, cls


def test_native_toy_load_skips_the_autotokenizer_import():
    """Loading a toy world natively (as ``pie prune`` does) does not import AutoTokenizer's module."""
    code = (
        "import sys\n"
        "from pie_lib.world import load_world\n"
        "for arch in ('gpt2', 'llama'):\n"
        "    w = load_world(f'toy:{arch}', f'toy:{arch}', device='cpu')\n"
        "    assert w.model.backend == 'native', w.model.backend\n"
        "    assert w.model.tokenize(['x']) and w.model.tokenizer.padding_side == 'left'\n"
        "print(sorted(m for m in ('transformers.models.auto.tokenization_auto', 'transformers.models') if m in sys.modules))\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    assert out.strip().splitlines()[-1] == "[]", out
