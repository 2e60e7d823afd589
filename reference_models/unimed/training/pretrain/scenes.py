"""Synthetic scenes for pretraining and probing: preprocessed images with per-patch class fractions and
image-level labels (`SceneSet`), drawn apart from the recipe's images."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from cmoe.reference_models.unimed.config import CLIP_MEAN, CLIP_STD
from cmoe.reference_models.unimed.data.images import preprocess_images
from cmoe.reference_models.unimed.data.synthetic import (
    LESION_LEVELS,
    LESION_RADII,
    MODALITIES,
    QUADRANTS,
    REGIONS,
    Scene,
    SyntheticConfig,
    make_scene,
)
from cmoe.reference_models.unimed.training.pretrain.config import GLOBAL_HEADS, ORGANS, PATCH_CLASSES


@dataclass
class SceneSet:
    """Preprocessed images and their labels: ``pixels [N, 3, S, S]``, ``patch [N, P, C]`` (class fractions per
    patch), ``organs [N, 12]`` (shown or not) and one int per image for each of `GLOBAL_HEADS`."""

    pixels: torch.Tensor
    patch: torch.Tensor
    organs: torch.Tensor
    labels: dict[str, torch.Tensor]

    def __len__(self) -> int:
        return self.pixels.shape[0]

    def take(self, index: torch.Tensor) -> SceneSet:
        return SceneSet(self.pixels[index], self.patch[index], self.organs[index],
                        {k: v[index] for k, v in self.labels.items()})


def _pixel_classes(scene: Scene, clean: np.ndarray) -> np.ndarray:
    """Per-pixel class index in `PATCH_CLASSES` from the texture-free rendering of `scene`."""
    classes = np.zeros(clean.shape, dtype=np.int64)
    for organ in scene.organs:
        classes[clean == organ.level] = PATCH_CLASSES.index(organ.name)
    classes[np.isin(clean, list(LESION_LEVELS.values()))] = len(PATCH_CLASSES) - 1
    return classes


def _scene_labels(scene: Scene) -> dict[str, int]:
    lesion = scene.lesion
    return {"modality": MODALITIES.index(scene.modality), "region": list(REGIONS).index(scene.region),
            "count": len(scene.organs) - 1,
            "lesion_quadrant": 0 if lesion is None else QUADRANTS.index(lesion.quadrant) + 1,
            "lesion_size": 0 if lesion is None else list(LESION_RADII).index(lesion.size) + 1,
            "lesion_kind": 0 if lesion is None else list(LESION_LEVELS).index(lesion.kind) + 1}


def make_scene_set(count: int, seed: int, start: int = 0, image_size: int = 32, patch_size: int = 4,
                   amplitudes: tuple[int, ...] = (10, 30)) -> SceneSet:
    """Scenes ``start .. start+count`` of the synthetic ``dense`` stream of `seed`, texture amplitudes cycling
    through `amplitudes`, with every label the encoder is trained and probed on."""
    images, patches, organs = [], [], []
    labels: dict[str, list[int]] = {name: [] for name in GLOBAL_HEADS}
    grid = image_size // patch_size
    for index in range(start, start + count):
        config = SyntheticConfig(image_size=image_size, seed=seed,
                                 texture_amplitude=amplitudes[index % len(amplitudes)])
        scene = make_scene(config, index)
        clean = make_scene(replace(config, texture_amplitude=0), index).image
        classes = _pixel_classes(scene, clean).reshape(grid, patch_size, grid, patch_size).transpose(0, 2, 1, 3)
        onehot = np.eye(len(PATCH_CLASSES), dtype=np.float32)[classes.reshape(grid * grid, -1)]
        patches.append(onehot.mean(1))
        organs.append([float(any(o.name == name for o in scene.organs)) for name in ORGANS])
        for name, value in _scene_labels(scene).items():
            labels[name].append(value)
        images.append(scene.image)
    pixels = preprocess_images(images, image_size, CLIP_MEAN, CLIP_STD)
    return SceneSet(pixels, torch.from_numpy(np.stack(patches)), torch.tensor(organs),
                    {name: torch.tensor(values) for name, values in labels.items()})
