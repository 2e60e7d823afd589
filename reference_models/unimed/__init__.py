"""The Uni-Med recipe (arXiv 2409.17508) on cmoe: data, model, training, evaluation and analysis.

`tasks`, `prompts`, `boxes` (the task identifiers, the ``[INST] ... [/INST]`` template, box text); `data`
(the common `Sample`, real-format loaders, the synthetic set, samplers, IMAX tools); `config` (YAML);
`model` (assembly and connector presets); `train` / `checkpoint` (the loop, exact resume, DDP/FSDP);
`metrics` / `evaluate`; `tug_of_war` / `analyze`; `experiment`. The command line is ``cmoe unimed``;
see docs/unimed.md.
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
