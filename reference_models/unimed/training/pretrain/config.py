"""The tiny components' architectures, the label sets of the encoder's heads, the budgets and seeds
(`PretrainConfig`, ``--set``), and the warm-up + cosine schedule both pretraining runs use."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch

from cmoe.errors import CMoEError, expect
from cmoe.reference_models.unimed.data.synthetic import (
    LESION_LEVELS,
    LESION_RADII,
    MODALITIES,
    ORGAN_LEVELS,
    QUADRANTS,
    REGIONS,
)

ENCODER_CONFIG: dict[str, Any] = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                  "num_attention_heads": 4, "image_size": 32, "patch_size": 4}
LLM_CONFIG: dict[str, Any] = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
                              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
                              "max_position_embeddings": 256}
"""The tiny config's architectures (``configs/tiny_random.yaml``); the pretrained weights have these shapes."""

ORGANS: tuple[str, ...] = tuple(ORGAN_LEVELS)
PATCH_CLASSES: tuple[str, ...] = ("background", *ORGANS, "lesion")
"""Per-patch classes of the encoder's dense head (and of the per-token probe)."""

GLOBAL_HEADS: dict[str, int] = {"modality": len(MODALITIES), "region": len(REGIONS), "count": 3,
                                "lesion_quadrant": len(QUADRANTS) + 1, "lesion_size": len(LESION_RADII) + 1,
                                "lesion_kind": len(LESION_LEVELS) + 1}
"""Image-level classification heads (lesion heads: class 0 = no lesion)."""


@dataclass
class PretrainConfig:
    """Budgets and seeds of `pretrain`. The defaults build the shipped weights (about 10 CPU-minutes on 2 cores).

    ``data_seed`` draws scenes apart from the recipe's (seed 0) training and test images.
    """

    seed: int = 0
    data_seed: int = 1000
    image_size: int = 32
    encoder_images: int = 4000
    encoder_steps: int = 2000
    encoder_batch: int = 64
    encoder_lr: float = 2e-3
    llm_images: int = 2000
    llm_steps: int = 400
    llm_batch: int = 64
    llm_lr: float = 3e-3
    probe_train_images: int = 1500
    probe_test_images: int = 500
    probe_steps: int = 300

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            expect(isinstance(value, (int, float)) and value >= 0, name, "a number >= 0", repr(value))


def pretrain_config(items: list[str]) -> PretrainConfig:
    """A `PretrainConfig` from ``key=value`` overrides (the command line's ``--set``)."""
    known = {f.name for f in fields(PretrainConfig)}
    values: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        expect(sep == "=" and key in known, "--set", f"key=value with a key among {sorted(known)}", repr(item))
        try:
            values[key] = float(value) if "." in value or "e" in value else int(value)
        except ValueError:
            raise CMoEError(f"--set {key}: expected a number, got {value!r}") from None
    return PretrainConfig(**values)


def schedule(optimizer: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear warm-up over 5 % of the steps, then cosine to zero."""
    warmup = max(1, steps // 20)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (
        1 + np.cos(np.pi * min(1.0, s / max(1, steps)))))
