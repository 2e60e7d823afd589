"""The two text processors the loaders and prompts apply to questions, object names, answers and QA instructions.

``original`` is the original's ``blip_caption_new`` (`original_text`; ``uni_med/processors/blip_processors.py``):
runs of two or more whitespace characters become one space, a trailing newline and the spaces at both ends go, and the text is
cut to 50 words counted between single spaces (so a lone newline or tab stays inside a "word"). ``cmoe`` is ours
(`prompts.clean_answer`): every run of whitespace is one space, words counted between any whitespace.

The loaders read which one applies from `using_text_processor` (set around loading by `load_split`), so every
loader keeps its plain signature.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from cmoe.errors import UnknownNameError

TEXT_PROCESSORS = ("original", "cmoe")
MAX_WORDS = 50


def original_text(text: str, max_words: int | None = MAX_WORDS) -> str:
    """The original's ``blip_caption_new``: ≥ 2 whitespace → one space, strip, cut to `max_words` space-words."""
    text = re.sub(r"\s{2,}", " ", text).rstrip("\n").strip(" ")
    words = text.split(" ")
    return " ".join(words[:max_words]) if max_words is not None and len(words) > max_words else text


_CURRENT: ContextVar[str] = ContextVar("cmoe_unimed_text_processor", default="cmoe")


def check_text_processor(name: str) -> str:
    if name not in TEXT_PROCESSORS:
        raise UnknownNameError("text processor", name, TEXT_PROCESSORS)
    return name


@contextmanager
def using_text_processor(name: str) -> Iterator[None]:
    """Within the block, the loaders apply text processor `name` (``original`` or ``cmoe``)."""
    token = _CURRENT.set(check_text_processor(name))
    try:
        yield
    finally:
        _CURRENT.reset(token)


def current_text_processor() -> str:
    return _CURRENT.get()
