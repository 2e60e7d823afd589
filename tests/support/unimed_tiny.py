"""A smaller-than-tiny recipe config for tests: same model family as ``tiny.yaml``, fewer images and steps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cmoe.reference_models.unimed.config import RecipeConfig, load_config


def test_config(output_dir: Path, **overrides: Any) -> RecipeConfig:
    """``tiny`` with 120 images, batch 4, 12 steps, no progress bar, checkpoints every 6 steps, no Java COCO
    caption metrics (their METEOR start-up is tested once, in test_unimed_coco_caption.py)."""
    base: dict[str, Any] = {
        "output_dir": str(output_dir),
        "data": {"synthetic": {"num_images": 120, "qa_questions": 40, "eval_images": 20}},
        "train": {"batch_size": 4, "steps": 12, "warmup_steps": 2, "log_every": 3, "save_every": 6,
                  "progress": False},
        "eval": {"limit_per_task": 6, "max_new_tokens": 12, "batch_size": 8, "coco_caption": False},
    }
    for key, value in overrides.items():
        section, field = key.split("__")
        base.setdefault(section, {})[field] = value
    return load_config("tiny", base)
