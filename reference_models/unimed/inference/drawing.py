"""A box drawn on an image, for REC answers and REG questions (``cmoe unimed predict --draw``, the web demo)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def draw_box(image: np.ndarray, box: Sequence[float], color: tuple[int, int, int] = (255, 40, 40)):
    """A PIL copy of `image` with `box` (pixel corners ``x1, y1, x2, y2``) outlined, the line width scaled to the
    image so it shows on small scans too."""
    from PIL import Image, ImageDraw

    picture = Image.fromarray(np.asarray(image)).convert("RGB")
    width = max(1, round(max(picture.size) / 100))
    ImageDraw.Draw(picture).rectangle([float(v) for v in box], outline=color, width=width)
    return picture
