"""Samples → a tokenised batch: prompt pieces around the image, answer tokens, pixels and task ids.

Each sample's prompt is split at the image placeholder; the model later puts the connector's visual
embeddings between the two pieces. The answer is tokenised apart, so the loss covers it alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from cmoe.reference_models.unimed.data.images import preprocess_images
from cmoe.reference_models.unimed.data.sample import Sample
from cmoe.reference_models.unimed.instructions import fixed_instruction, pool_of
from cmoe.reference_models.unimed.prompt_style import PROMPT_STYLES, PromptStyle
from cmoe.reference_models.unimed.prompts import PromptParts, build_prompt, split_at_image
from cmoe.reference_models.unimed.tasks import get_task
from cmoe.reference_models.unimed.text_processing import MAX_WORDS, original_text

IMAGE_TASKS = ("vqa", "report", "rec", "reg", "cls")
"""Tasks that have an image, in the order of the connector's task ids (one learned task token each)."""


def sample_prompt(sample: Sample, style: PromptStyle, training: bool) -> PromptParts:
    """The prompt `sample` is trained (`training`) or asked with under `style`, as the original words it:

    - the instruction: the pool template drawn for it (``sample.meta["template"]``, set per read by training
      under ``templates: pools``), else the fixed one its evaluation uses (PubMedQA's own under
      ``pubmedqa_instruction: own``); a QA instruction goes whole through the ``original`` text processor (cut
      to the loader's ``instruction_words``), as the original processes it after drawing the template;
    - the stray space before ``[/INST]`` (``space_before_inst``): in training prompts of image tasks, and in the
      report eval prompts, as the original's datasets and caption eval script write them.
    """
    task = get_task(sample.task)
    template = sample.meta.get("template") if training and style.templates == "pools" else None
    pool = pool_of(sample.source, sample.task)
    if template is not None and pool is not None:
        instruction = pool.instruction(template, sample.fields)
    else:
        instruction = fixed_instruction(sample.task, sample.fields, sample.source,
                                        pubmedqa_own=style.pubmedqa_instruction == "own")
    if sample.task == "qa" and style.text_processor == "original":
        instruction = original_text(instruction, sample.meta.get("instruction_words", MAX_WORDS))
    space = style.space_before_inst and task.has_image and (training or sample.task == "report")
    return build_prompt(task, sample.fields, sample.answer if training else "", instruction=instruction,
                        space_before_inst=space)


def task_id(task: str) -> int:
    """The connector's task id of `task`; -1 for text-only QA, which never reaches the connector."""
    return IMAGE_TASKS.index(task) if task in IMAGE_TASKS else -1


@dataclass
class EncodedText:
    """Token ids of one sample: before the image (with BOS), after it (the whole prompt if text-only), answer."""

    before: list[int]
    after: list[int]
    answer: list[int]
    has_image: bool


@dataclass
class Batch:
    """A collated batch; ``pixel_values`` holds the images of the samples with ``has_image``, in order."""

    samples: list[Sample]
    texts: list[EncodedText]
    task_ids: torch.Tensor
    pixel_values: torch.Tensor | None

    @property
    def tasks(self) -> list[str]:
        return [sample.task for sample in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def to(self, device: torch.device | str) -> Batch:
        pixels = None if self.pixel_values is None else self.pixel_values.to(device, non_blocking=True)
        return Batch(self.samples, self.texts, self.task_ids.to(device), pixels)


class Collator:
    """Tokenises and preprocesses a list of `Sample`s into a `Batch` (usable as a DataLoader ``collate_fn``).

    With ``with_answers=False`` the answers are left out (generation). Text longer than `max_text_tokens` is cut:
    the answer first (keeping at least one token), then the middle of the prompt after the image.
    """

    def __init__(self, tokenizer, image_size: int, mean: Sequence[float], std: Sequence[float],
                 max_text_tokens: int = 1024, with_answers: bool = True, style: PromptStyle | None = None):
        self.tokenizer = tokenizer
        self.image_size, self.mean, self.std = image_size, tuple(mean), tuple(std)
        self.max_text_tokens = max_text_tokens
        self.with_answers = with_answers
        self.style = style or PROMPT_STYLES["cmoe"]

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids if text else []

    def encode(self, sample: Sample) -> EncodedText:
        parts = sample_prompt(sample, self.style, training=self.with_answers)
        pieces = split_at_image(parts.prompt)
        before, after = pieces if pieces is not None else ("", parts.prompt)
        # The original's eval prompts carry "<s>" in their text besides the tokenizer's BOS (`eval_bos: 2`).
        repeat = 1 if self.with_answers else self.style.eval_bos
        bos = [] if self.tokenizer.bos_token_id is None else [self.tokenizer.bos_token_id] * repeat
        before_ids, after_ids = bos + self._ids(before), self._ids(after)
        answer_ids = self._ids(sample.answer) + [self.tokenizer.eos_token_id] if self.with_answers else []
        budget = self.max_text_tokens - len(before_ids) - len(after_ids)
        if len(answer_ids) > max(budget, 1):
            answer_ids = answer_ids[:max(budget, 1)]
        overflow = len(before_ids) + len(after_ids) + len(answer_ids) - self.max_text_tokens
        if overflow > 0:
            keep_tail = min(8, len(after_ids))
            after_ids = after_ids[:max(0, len(after_ids) - keep_tail - overflow)] + after_ids[-keep_tail:]
        return EncodedText(before_ids, after_ids, answer_ids, pieces is not None)

    def __call__(self, samples: Sequence[Sample]) -> Batch:
        samples = list(samples)
        texts = [self.encode(sample) for sample in samples]
        images = [sample.image for sample, text in zip(samples, texts) if text.has_image]
        pixels = preprocess_images(images, self.image_size, self.mean, self.std,
                                   width_first=self.style.resize == "pillow10") if images else None
        task_ids = torch.tensor([task_id(sample.task) for sample in samples], dtype=torch.long)
        return Batch(samples, texts, task_ids, pixels)
