"""Tokenizers for the recipe: the LLM's own from a local path, or a small word-level one built from the data.

The tiny default has no pretrained LLM, so its tokenizer is a word-level vocabulary over the synthetic set
(lower-cased words, each punctuation mark its own token, the numbers 0–100 for boxes), built with the
`tokenizers` library and wrapped as a ``PreTrainedTokenizerFast`` so it saves and loads like any HF tokenizer.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from cmoe.errors import CMoEError
from cmoe.reference_models.unimed.model.sentencepiece_llama import OriginalLlamaTokenizer, sentencepiece_model

SPECIAL_TOKENS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}


def _word_pipeline():
    from tokenizers import normalizers, pre_tokenizers

    return normalizers.Lowercase(), pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation("isolated")])


def words_of(texts: Iterable[str]) -> list[str]:
    """The distinct words of `texts` as the word-level tokenizer splits them, in first-seen order."""
    normalizer, pre_tokenizer = _word_pipeline()
    seen: dict[str, None] = {}
    for text in texts:
        for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)):
            seen.setdefault(word, None)
    return list(seen)


def build_word_tokenizer(texts: Iterable[str]):
    """A word-level ``PreTrainedTokenizerFast`` whose vocabulary is the special tokens, the numbers 0–100 and
    every word of `texts`; unknown words map to ``<unk>``."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for word in [*SPECIAL_TOKENS.values(), *map(str, range(101)), *words_of(texts)]:
        vocab.setdefault(word, len(vocab))
    model = Tokenizer(models.WordLevel(vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    model.normalizer, model.pre_tokenizer = _word_pipeline()
    return PreTrainedTokenizerFast(tokenizer_object=model, **SPECIAL_TOKENS)


def load_tokenizer(path: str | os.PathLike, original: bool = False):
    """The tokenizer saved in a LOCAL directory (e.g. LLaMA-2's); nothing is downloaded. A tokenizer without a
    pad token gets its unk (or eos) token as pad: padding is masked out of attention and loss anyway.

    With `original` (``prompts.tokenizer: original``) and a SentencePiece ``tokenizer.model`` in the folder, the
    result tokenises as the original's slow transformers-4.30 ``LlamaTokenizer`` (`OriginalLlamaTokenizer`);
    a folder without one (e.g. the tiny word-level tokenizer) loads as it is (run records read the tokenizer's ``cmoe_setting``)."""
    from transformers import AutoTokenizer

    if not Path(path).is_dir():
        raise CMoEError(f"tokenizer path: expected a local directory with the tokenizer files, got {str(path)!r} "
                        "(not found); nothing is downloaded")
    model_file = sentencepiece_model(path)
    if original and model_file is not None:
        return OriginalLlamaTokenizer(model_file)
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return tokenizer
