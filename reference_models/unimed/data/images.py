"""Image preprocessing as in the original: RGB, bicubic resize to the encoder's size, CLIP mean/std."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from cmoe.errors import CMoEError, expect
from cmoe.reference_models.unimed.data.sample import ImageLike


def to_pil(image: ImageLike):
    """A PIL RGB image from a path or an ``[H, W]`` / ``[H, W, 3]`` uint8 array."""
    from PIL import Image

    if isinstance(image, np.ndarray):
        expect(image.dtype == np.uint8 and image.ndim in (2, 3), "image", "a uint8 [H, W] or [H, W, 3] array",
               f"{image.dtype} array of shape {image.shape}")
        return Image.fromarray(image).convert("RGB")
    expect(image is not None, "image", "a path or an array", None)
    path = Path(image)
    if not path.is_file():
        raise CMoEError(f"image: file not found: {path}; check the dataset root and its layout")
    with Image.open(path) as opened:
        return opened.convert("RGB")


def resize_bicubic(image, size: int, width_first: bool = False):
    """`image` resized to ``size × size`` with PIL's bicubic filter; `width_first` resamples the width, then the
    height, in two calls: what Pillow 10.0.1 (the original's pin) does in one. Newer Pillow may take the height
    first, which changes up to ~16/255 of some pixels of images taller than wide (tests/unimed/paper/test_unimed_original_run.py
    checks the two-pass result against the original's pixels)."""
    from PIL import Image

    if width_first:
        image = image.resize((size, image.height), Image.BICUBIC)
    return image.resize((size, size), Image.BICUBIC)


def preprocess_images(images: Sequence[ImageLike], size: int, mean: Sequence[float],
                      std: Sequence[float], width_first: bool = False) -> torch.Tensor:
    """``[n, 3, size, size]`` float pixels: bicubic resize (`resize_bicubic`), scaled to 0–1, normalised by
    `mean` / `std`."""
    arrays = [np.asarray(resize_bicubic(to_pil(image), size, width_first), dtype=np.float32) for image in images]
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 255.0
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (pixels - mean_t) / std_t
