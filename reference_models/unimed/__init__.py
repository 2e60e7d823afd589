"""The Uni-Med recipe (arXiv 2409.17508) on cmoe: task identifiers, prompt template and box text format.

Built so far: `tasks` (the six tasks, their identifiers and instructions), `prompts` (the ``[INST] ...
[/INST]`` template with the image placeholder, answer clean-up) and `boxes` (``{<x1><y1><x2><y2>}`` in 0–100,
encode and a tolerant parser, IoU). Model assembly, data, training and evaluation are planned (issue 5).
"""

from cmoe.reference_models.unimed.boxes import Box, box_iou, encode_box, parse_box
from cmoe.reference_models.unimed.prompts import (
    IMAGE_PLACEHOLDER,
    PromptParts,
    build_prompt,
    clean_answer,
    split_at_image,
)
from cmoe.reference_models.unimed.tasks import TASKS, Task, get_task

__all__ = ["Box", "IMAGE_PLACEHOLDER", "PromptParts", "TASKS", "Task", "box_iou", "build_prompt", "clean_answer",
           "encode_box", "get_task", "parse_box", "split_at_image"]
