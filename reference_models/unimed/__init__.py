"""The Uni-Med recipe (arXiv 2409.17508) on cmoe, arranged by job; each layer imports only the ones before it:

1. base modules here: `tasks`, `prompts`, `boxes` (task identifiers, the ``[INST] ... [/INST]`` template, box
   text), `config` (the YAML recipe config), `original` (the original code's names);
2. `data` — the common `Sample`, real-format loaders, the synthetic set, splits, images, samplers, IMAX tools;
3. `model` — assembly and connector presets, tokenizer, collator, the checkpoint format, paper-scale build;
4. `evaluation` — the paper's metrics and evaluating every task;
5. `analysis` — the tug-of-war analysis;
6. `training` — the loop with exact resume, DDP/FSDP, pretraining the shipped tiny components;
7. `experiments` and `paper` — seeded comparisons; the paper-scale step and original-checkpoint conversion;
8. `cli` / `plugin` — ``cmoe unimed``. tests/core/test_import_layers.py keeps the order. See docs/unimed.md.
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
