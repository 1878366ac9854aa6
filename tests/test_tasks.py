"""Pair generators (pie_lib.data.tasks) and the JSONL pair format (pie_lib.data.pairs)."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from pie_lib.data.pairs import Pair, load_pairs, save_pairs
from pie_lib.data.tasks import (
    ARGS,
    IOI_HELDOUT_TEMPLATES,
    IOI_TEMPLATES,
    IOI_TRAIN_TEMPLATES,
    NAMES,
    TaskPairs,
    docstring_pairs,
    generate_task,
    ioi_pairs,
)
from pie_lib.errors import DataFormatError
from pie_lib.toy.corpus import training_texts, vocabulary_texts
from pie_lib.toy.tokenizer import build_tokenizer


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return build_tokenizer(vocabulary_texts())


@pytest.fixture(scope="module")
def bpe_tok() -> PreTrainedTokenizerFast:
    """A GPT-2-style byte-level BPE trained on toy text with a small vocabulary: some names split."""
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    texts, _ = training_texts(3000, seed=1)
    trainer = trainers.BpeTrainer(
        vocab_size=700, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    t.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=t)


def n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def check_pairs(tokenizer, tp: TaskPairs, n: int) -> None:
    assert len(tp.pairs) == n
    for p in tp.pairs:
        assert n_tokens(tokenizer, p.text_clean) == n_tokens(tokenizer, p.text_corr)
        assert p.io_clean.startswith(" ") and p.s_clean.startswith(" ")
        assert n_tokens(tokenizer, p.io_clean) == 1 and n_tokens(tokenizer, p.s_clean) == 1
        assert p.io_clean != p.s_clean


def test_template_lists() -> None:
    assert len(IOI_TEMPLATES) >= 4 and len(NAMES) >= 30 and len(ARGS) >= 30
    assert set(IOI_TRAIN_TEMPLATES) | set(IOI_HELDOUT_TEMPLATES) == set(IOI_TEMPLATES)
    assert not set(IOI_TRAIN_TEMPLATES) & set(IOI_HELDOUT_TEMPLATES)


@pytest.mark.parametrize("corruption", ["abc", "s2_io"])
def test_ioi_pairs_toy(tok, corruption) -> None:
    tp = ioi_pairs(tok, 200, seed=3, corruption=corruption)
    check_pairs(tok, tp, 200)
    assert tp.dropped == {"multi_token_names": 0, "unk_names": 0, "length_mismatch": 0}
    orders = {p.meta["order"] for p in tp.pairs}
    assert orders == {"ABBA", "BABA"}
    for p in tp.pairs:
        io, s = p.io_clean.strip(), p.s_clean.strip()
        words = p.text_clean.replace(",", " ").replace(".", " ").split()
        names = [w for w in words if w in NAMES]
        assert names == ([io, s, s] if p.meta["order"] == "ABBA" else [s, io, s])
        corr_names = [w for w in p.text_corr.replace(",", " ").replace(".", " ").split() if w in NAMES]
        if corruption == "abc":
            assert len(set(corr_names)) == 3 and not set(corr_names) & {io, s}
        else:  # second S replaced by IO: the answer flips to S
            assert corr_names == names[:2] + [io]


def test_docstring_pairs_toy(tok) -> None:
    tp = docstring_pairs(tok, 100, seed=5)
    check_pairs(tok, tp, 100)
    for p in tp.pairs:
        args, corr_args, k = p.meta["args"], p.meta["corr_args"], p.meta["target_index"]
        assert len(args) == 3 and k == 2
        assert p.io_clean == " " + args[k] and p.s_clean == " " + corr_args[k]
        assert not set(args) & set(corr_args)
        head_c, _, doc_c = p.text_clean.partition('"""')
        head_x, _, doc_x = p.text_corr.partition('"""')
        assert doc_c == doc_x and head_c != head_x  # same docstring, different def
        assert doc_c.count(":param") == k + 1 and doc_c.rstrip().endswith(":param")
    tp4 = docstring_pairs(tok, 10, seed=5, n_args=5, n_documented=1)
    assert all(p.io_clean == " " + p.meta["args"][1] for p in tp4.pairs)


def test_determinism(tok) -> None:
    for task in ("ioi", "docstring"):
        a = generate_task(task, tok, 30, seed=11)
        b = generate_task(task, tok, 30, seed=11)
        c = generate_task(task, tok, 30, seed=12)
        assert [p.to_json() for p in a.pairs] == [p.to_json() for p in b.pairs]
        assert [p.to_json() for p in a.pairs] != [p.to_json() for p in c.pairs]
    with pytest.raises(ValueError, match="unknown task"):
        generate_task("sva", tok, 3)  # type: ignore[arg-type]


def test_drop_counting_unknown_and_multi_token(tok) -> None:
    names = [*NAMES[:10], "Mary Ann", "Jean Luc", "Zebulon", "Quincy"]  # 2 multi-word, 2 not in the vocab
    tp = ioi_pairs(tok, 20, seed=0, names=names)
    assert tp.dropped["multi_token_names"] == 2 and tp.dropped["unk_names"] == 2
    used = {p.io_clean.strip() for p in tp.pairs} | {p.s_clean.strip() for p in tp.pairs}
    assert used <= set(NAMES[:10])
    tp = docstring_pairs(tok, 5, seed=0, args=[*ARGS[:8], "max size", "foobarbaz"])
    assert tp.dropped["multi_token_args"] == 1 and tp.dropped["unk_args"] == 1
    with pytest.raises(DataFormatError, match="single tokens"):
        ioi_pairs(tok, 5, names=NAMES[:3])


def test_bpe_tokenizer(bpe_tok) -> None:
    """Any HF tokenizer: a byte-level BPE where some names are several tokens."""
    tp = ioi_pairs(bpe_tok, 50, seed=0)
    check_pairs(bpe_tok, tp, 50)
    multi = sum(n_tokens(bpe_tok, " " + n) != 1 for n in NAMES)
    assert tp.dropped["multi_token_names"] == multi and 0 < multi <= len(NAMES) - 5
    tp = docstring_pairs(bpe_tok, 20, seed=0)
    check_pairs(bpe_tok, tp, 20)


class _QuirkyTokenizer:
    """Whitespace tokenizer that splits "Zed" into two tokens except when it stands alone."""

    unk_token_id = None

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        words = text.split()
        ids = []
        for w in words:
            ids += [hash(w) % 1000] * (2 if w == "Zed" and len(words) > 1 else 1)
        return {"input_ids": ids}


def test_length_mismatch_dropped() -> None:
    q = _QuirkyTokenizer()
    tp = ioi_pairs(q, 40, seed=0, names=["Zed", *NAMES[:6]])
    assert tp.dropped["length_mismatch"] > 0
    assert all(len(q(p.text_clean)["input_ids"]) == len(q(p.text_corr)["input_ids"]) for p in tp.pairs)


def test_bad_template(tok) -> None:
    with pytest.raises(DataFormatError, match="slot"):
        ioi_pairs(tok, 2, templates=["{A} and {B} went home. {C} waved to"])
    with pytest.raises(DataFormatError, match=r"\{C\}"):
        ioi_pairs(tok, 2, templates=["When {A} and {B} left, she waved to"])
    with pytest.raises(ValueError, match="corruption"):
        ioi_pairs(tok, 2, corruption="zero")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- JSONL
def test_jsonl_round_trip(tok, tmp_path) -> None:
    pairs = ioi_pairs(tok, 12, seed=1).pairs + docstring_pairs(tok, 12, seed=1).pairs
    path = save_pairs(pairs, tmp_path / "pairs.jsonl")
    back = load_pairs(path)
    assert back == pairs
    assert [p.meta for p in back] == [p.meta for p in pairs]
    assert load_pairs(path, limit=5) == pairs[:5]


def test_jsonl_malformed(tmp_path) -> None:
    good = json.dumps(Pair("a b", "c d", " x", " y").to_json())
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text(good + "\n{not json\n")
    with pytest.raises(DataFormatError, match=r"bad\.jsonl:2: invalid JSON"):
        load_pairs(bad_json)
    missing = tmp_path / "missing.jsonl"
    missing.write_text(
        good + "\n" + good + "\n" + json.dumps({"text_clean": "a", "text_corr": "b", "io_clean": " x"}) + "\n"
    )
    with pytest.raises(DataFormatError, match=r"missing\.jsonl:3: missing key.*s_clean"):
        load_pairs(missing)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataFormatError, match=r"empty\.jsonl.*empty"):
        load_pairs(empty)
