"""Example images to ask a model about without bringing one: scans of the built-in synthetic test set.

The same generator as the tiny configs' data (``SyntheticConfig`` seed 0, the test split's image stream), so the
examples are images the tiny model was not trained on, each with a question of every image task it supports.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from cmoe.reference_models.unimed.data.synthetic import SyntheticConfig, generate_splits
from cmoe.reference_models.unimed.inference.predictor import TEXT_FIELD


@dataclass(frozen=True)
class Example:
    """One example image (``[H, W, 3]`` uint8) and, per task, the text to ask it with."""

    name: str
    image: np.ndarray
    texts: dict[str, str] = field(default_factory=dict)


@lru_cache(maxsize=4)
def examples(count: int = 4, image_size: int = 32) -> tuple[Example, ...]:
    """The first `count` test images of the synthetic set at `image_size` (the tiny model's 32), as RGB arrays."""
    test = generate_splits(SyntheticConfig(num_images=20, image_size=image_size, seed=0, qa_questions=4),
                           eval_images=count)["test"]
    by_image: dict[str, dict] = {}
    for sample in test:
        if sample.image is None or sample.image_id is None:
            continue
        entry = by_image.setdefault(sample.image_id, {"image": sample.image, "texts": {}})
        entry["texts"].setdefault(sample.task, sample.fields[TEXT_FIELD[sample.task]])
    result = []
    for index, entry in enumerate(list(by_image.values())[:count]):
        image = np.asarray(entry["image"])
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=2)
        result.append(Example(f"example-{index + 1}", image, dict(entry["texts"])))
    return tuple(result)
