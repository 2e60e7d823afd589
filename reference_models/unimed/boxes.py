"""Boxes as text: pixel ``[x, y, w, h]`` ↔ ``{<x1><y1><x2><y2>}`` with coordinates in 0–100 of the image size.

`encode_box` follows the original (``int(v / size · 100)``) but clamps to 0–100. `parse_box` is tolerant of
what a model writes: spaces, missing braces, commas, coordinates out of range (clamped) or in reversed order
(swapped). Unparseable text gives None, which evaluation scores as IoU 0.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from cmoe.errors import expect

SCALE = 100


class Box(NamedTuple):
    """Corners in the 0–100 text scale: ``x1 <= x2``, ``y1 <= y2``."""

    x1: int
    y1: int
    x2: int
    y2: int

    def to_pixels(self, width: int, height: int) -> tuple[float, float, float, float]:
        """``(x, y, w, h)`` in pixels of a `width` × `height` image."""
        sx, sy = width / SCALE, height / SCALE
        return self.x1 * sx, self.y1 * sy, (self.x2 - self.x1) * sx, (self.y2 - self.y1) * sy


def _scaled(value: float, size: int) -> int:
    return min(SCALE, max(0, int(value * SCALE / size)))


def encode_box(xywh: tuple[float, float, float, float], width: int, height: int) -> str:
    """Pixel ``(x, y, w, h)`` on a `width` × `height` image → ``{<x1><y1><x2><y2>}``."""
    expect(len(xywh) == 4, "box", "(x, y, w, h) in pixels", xywh)
    expect(width > 0 and height > 0, "image size", "positive width and height", (width, height))
    x, y, w, h = xywh
    expect(w >= 0 and h >= 0, "box", "non-negative width and height", xywh)
    corners = (_scaled(x, width), _scaled(y, height), _scaled(x + w, width), _scaled(y + h, height))
    return "{" + "".join(f"<{c}>" for c in corners) + "}"


_NUMBER = re.compile(r"<\s*(-?\d+(?:\.\d+)?)\s*>")


def parse_box(text: str) -> Box | None:
    """The first four ``<n>`` numbers in `text` as a `Box` (clamped to 0–100, corners ordered), else None."""
    numbers = [float(n) for n in _NUMBER.findall(text)]
    if len(numbers) < 4:
        return None
    x1, y1, x2, y2 = (min(SCALE, max(0, round(v))) for v in numbers[:4])
    return Box(min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2))


def box_iou(a: Box | None, b: Box | None) -> float:
    """Intersection over union of two boxes; 0 when either is missing or both are empty."""
    if a is None or b is None:
        return 0.0
    iw = max(0, min(a.x2, b.x2) - max(a.x1, b.x1))
    ih = max(0, min(a.y2, b.y2) - max(a.y1, b.y1))
    inter = iw * ih
    union = (a.x2 - a.x1) * (a.y2 - a.y1) + (b.x2 - b.x1) * (b.y2 - b.y1) - inter
    return inter / union if union > 0 else 0.0


_PIXEL_BOX = re.compile(r"^\s*\(?\s*([-+]?\d+(?:\.\d*)?)(?:\s*[,\s]\s*([-+]?\d+(?:\.\d*)?)){3}\s*\)?\s*$")


def parse_pixel_box(text: str) -> list[float] | None:
    """``[x1, y1, x2, y2]`` from four numbers a person types for a box in pixels (``10,20,30,40``, ``10 20 30 40``,
    ``(10, 20, 30, 40)``); None when the text is not four numbers. Whether they fit the image is checked where the
    image is known (`grid_box`)."""
    if not _PIXEL_BOX.match(text):
        return None
    return [float(v) for v in re.findall(r"[-+]?\d+(?:\.\d*)?", text)]
