"""Uni-Med's prompt template: ``[INST] <Img><ImageHere></Img> [task] instruction [/INST]`` + answer + ``</s>``.

The connector's visual embeddings replace ``<ImageHere>``; text-only tasks (QA) have no image part. The loss
covers the answer tokens only, so the prompt and the answer are kept apart (`PromptParts`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from cmoe.reference_models.unimed.tasks import Task

IMAGE_PLACEHOLDER = "<ImageHere>"
END_OF_ANSWER = "</s>"


@dataclass(frozen=True)
class PromptParts:
    """The prompt (everything the model is conditioned on) and the answer it is trained to produce."""

    prompt: str
    answer: str


def build_prompt(task: Task, instruction_fields: dict[str, str], answer: str = "",
                 with_image: bool | None = None, instruction: str | None = None,
                 space_before_inst: bool = False) -> PromptParts:
    """The full prompt for one sample of `task`, and its answer followed by ``</s>`` (empty when generating).

    `instruction` replaces the task's template (e.g. one drawn from the original's pools); `space_before_inst`
    ends the instruction with the original's stray space (``"... [/INST]"`` then has two spaces)."""
    image = task.has_image if with_image is None else with_image
    image_part = f"<Img>{IMAGE_PLACEHOLDER}</Img> " if image else ""
    text = task.instruction(**instruction_fields) if instruction is None else instruction
    prompt = f"[INST] {image_part}{text}{' ' if space_before_inst else ''} [/INST]"
    return PromptParts(prompt=prompt, answer=f"{answer}{END_OF_ANSWER}" if answer else "")


def split_at_image(prompt: str) -> tuple[str, str] | None:
    """``(before, after)`` the image placeholder, or None for a text-only prompt; two placeholders are an error."""
    count = prompt.count(IMAGE_PLACEHOLDER)
    if count == 0:
        return None
    if count > 1:
        raise ValueError(f"prompt: expected at most one {IMAGE_PLACEHOLDER}, got {count}: {prompt!r}")
    before, after = prompt.split(IMAGE_PLACEHOLDER)
    return before, after


def original_answer(text: str, bos: str = "<s>", eos: str = END_OF_ANSWER) -> str:
    """A decoded answer as the original's ``generate`` returns it: cut at `eos`, `bos` removed, what follows the
    last ``[/INST]``, stripped; no whitespace collapsing and no word limit."""
    return text.split(eos)[0].replace(bos, "").split("[/INST]")[-1].strip()


def clean_answer(text: str, max_words: int = 50) -> str:
    """Whitespace collapsed, ``</s>`` dropped, cut to `max_words` words (the original's answer clean-up)."""
    text = text.replace(END_OF_ANSWER, " ")
    return " ".join(re.split(r"\s+", text.strip())[:max_words]) if text.strip() else ""
