"""One training or evaluation entry of any task, in one shape for every dataset.

Loaders (real public formats) and the synthetic generator all produce `Sample`s; the collator turns them
into prompts (`cmoe.reference_models.unimed.prompts`) and pixels, evaluation compares `answer` with the
model's output, and the IMAX tools group them by `image_id`.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np

from cmoe.errors import expect
from cmoe.reference_models.unimed.tasks import TASKS

ImageLike = Union[str, os.PathLike, np.ndarray, None]
"""A path to an image file, an ``[H, W]`` or ``[H, W, 3]`` uint8 array, or None for text-only tasks."""


@dataclass
class Sample:
    """One entry: a task, the fields its instruction template needs, the expected answer and the image.

    ``fields`` fills the task's instruction template (``question``, ``object``, ``box``, ``classes``);
    ``image_id`` identifies the image across datasets (for IMAX merging; see `image_identity`); ``source``
    names the dataset the entry came from (the mixing ratios are per source); ``meta`` holds what evaluation
    needs beyond the answer, e.g. ``answer_type`` (``"closed"``/``"open"`` for VQA), ``box`` (the 0–100 box
    for REC), ``label`` (class index for classification).
    """

    task: str
    fields: dict[str, str]
    answer: str
    image: ImageLike = None
    image_id: str | None = None
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        expect(self.task in TASKS, "task", f"one of {sorted(TASKS)}", repr(self.task))
        expect(isinstance(self.fields, dict), "fields", "a dict of instruction fields", type(self.fields).__name__)
        needs_image = TASKS[self.task].has_image
        expect(not needs_image or self.image is not None, "image",
               f"an image (path or array) for task {self.task!r}", None)


def image_identity(image: ImageLike) -> str | None:
    """A stable id for an image: the SHA-1 of its file bytes or array bytes (None for no image)."""
    if image is None:
        return None
    digest = hashlib.sha1()
    if isinstance(image, np.ndarray):
        digest.update(str((image.shape, image.dtype.str)).encode())
        digest.update(np.ascontiguousarray(image).tobytes())
    else:
        digest.update(Path(image).read_bytes())
    return digest.hexdigest()
