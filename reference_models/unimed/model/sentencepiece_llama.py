"""LLaMA's tokenizer as the original Uni-Med runs it: transformers 4.30's slow SentencePiece ``LlamaTokenizer``.

The original builds ``LlamaTokenizer.from_pretrained(path, use_fast=False)`` with pad token ``"$$"``. Today's
transformers loads the same folder as a fast tokenizer whose treatment of text next to a special token and of a
leading space differs (e.g. ``"<s>[INST]"``: the slow one encodes the text after ``<s>`` as a fresh SentencePiece
input, with its dummy-prefix ``▁``). `OriginalLlamaTokenizer` reproduces the slow one on the folder's
``tokenizer.model`` with the ``sentencepiece`` library:

- encoding: the text is split at the special tokens ``<unk>``, ``<s>``, ``</s>`` (which become their ids; the text
  around them is kept as is, as their ``AddedToken`` records ask); every other piece is encoded by SentencePiece
  on its own (so each gets the dummy prefix); BOS first when `add_special_tokens`;
- decoding with ``skip_special_tokens``: the special ids (pad's included: ``"$$"``'s id, ``<unk>`` where the
  vocabulary has no ``$$``) are dropped and the rest decoded by SentencePiece in one go;
- ``pad_token_id`` is ``"$$"``'s id, and the original masks any answer token equal to it from the loss.

Checked against transformers 4.30 itself (tests/data/unimed_original_run/golden.json, "tokenizer").
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from cmoe.errors import CMoEError

SPECIAL = ("<unk>", "<s>", "</s>")
ORIGINAL_PAD = "$$"
SENTENCEPIECE_FILE = "tokenizer.model"
TOKENIZER_FILES = (SENTENCEPIECE_FILE, "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json")


class OriginalLlamaTokenizer:
    """The slow LLaMA tokenizer of transformers 4.30 (what the original uses) on a SentencePiece `model_file`.

    Encodes and decodes as the original does; saving copies the tokenizer files of the model file's folder
    (``tokenizer.model``, ``tokenizer_config.json``, ``special_tokens_map.json``, ``tokenizer.json``), so a
    checkpoint's ``tokenizer/`` folder loads either way.
    """

    cmoe_setting = "original"
    """What run records call this tokenizer (``prompts.tokenizer``)."""

    def __init__(self, model_file: str | os.PathLike):
        try:
            import sentencepiece
        except ImportError:
            raise CMoEError("prompts.tokenizer: 'original' needs the sentencepiece package (pip install "
                            "'cmoe[unimed]'), or set prompts.tokenizer=as_loaded") from None
        self.model_file = Path(model_file)
        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(self.model_file))
        self.unk_token, self.bos_token, self.eos_token = SPECIAL
        self.pad_token = ORIGINAL_PAD
        self.unk_token_id, self.bos_token_id, self.eos_token_id = (self.sp.unk_id(), self.sp.bos_id(),
                                                                    self.sp.eos_id())
        self.pad_token_id = self.sp.piece_to_id(ORIGINAL_PAD)
        self._special_ids = {self.sp.piece_to_id(token) for token in SPECIAL} | {self.pad_token_id}
        self._split = re.compile("(" + "|".join(re.escape(token) for token in SPECIAL) + ")")

    def __len__(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [self.bos_token_id] if add_special_tokens else []
        for piece in self._split.split(text):
            if not piece:
                continue
            ids.extend([self.sp.piece_to_id(piece)] if piece in SPECIAL else self.sp.encode(piece))
        return ids

    def __call__(self, text: str, add_special_tokens: bool = True, **_: Any) -> SimpleNamespace:
        return SimpleNamespace(input_ids=self.encode(text, add_special_tokens))

    def decode(self, ids: Any, skip_special_tokens: bool = False) -> str:
        """The text of `ids`; special tokens are dropped (`skip_special_tokens`) or written out, with a space
        before a special token that follows ordinary ones (4.30's ``convert_tokens_to_string``)."""
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            return self.sp.decode([i for i in ids if i not in self._special_ids])
        text, pending, previous_special = "", [], False
        for position, index in enumerate(ids):
            piece = self.sp.id_to_piece(index)
            if index in self._special_ids:
                if not previous_special and position != 0:
                    text += " "
                text += self.sp.decode(pending) + piece
                pending, previous_special = [], True
            else:
                pending.append(index)
                previous_special = False
        return text + self.sp.decode(pending)

    def batch_decode(self, sequences: Any, skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(ids, skip_special_tokens) for ids in sequences]

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for name in TOKENIZER_FILES:
            source = self.model_file.parent / name
            if source.is_file():
                shutil.copyfile(source, directory / name)


def sentencepiece_model(directory: str | os.PathLike) -> Path | None:
    """The folder's ``tokenizer.model`` (a SentencePiece model), if it has one."""
    path = Path(directory) / SENTENCEPIECE_FILE
    return path if path.is_file() else None
