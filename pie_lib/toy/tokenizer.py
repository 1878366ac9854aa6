"""The toy world's word-level tokenizer (``tokenizers`` WordLevel, loadable by AutoTokenizer).

Pre-tokenisation is ``Whitespace`` (``\\w+|[^\\w\\s]+``), so ``"store,"`` is ``store`` ``,`` and
``' Mary'`` is one word: ``tokenizer(" Mary")`` gives ``[<bos>, Mary]`` (the post-processor
prepends ``<bos>``). Special tokens: ``<pad>`` = 0, ``<unk>`` = 1, ``<bos>`` = 2.
"""

from __future__ import annotations

from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

PAD, UNK, BOS = "<pad>", "<unk>", "<bos>"
SPECIAL_TOKENS = (PAD, UNK, BOS)


def build_tokenizer(texts: Iterable[str]) -> PreTrainedTokenizerFast:
    """A WordLevel tokenizer over every word in ``texts`` (sorted, so the ids are deterministic).

    Args:
        texts: the texts whose words form the vocabulary.
    Returns:
        A ``PreTrainedTokenizerFast`` with bos/unk/pad set and right padding.
    """
    pre = pre_tokenizers.Whitespace()
    words = sorted({w for t in texts for w, _ in pre.pre_tokenize_str(t)} - set(SPECIAL_TOKENS))
    vocab = {tok: i for i, tok in enumerate((*SPECIAL_TOKENS, *words))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces, tidies punctuation
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        unk_token=UNK,
        pad_token=PAD,
        padding_side="right",
        model_max_length=256,
    )
