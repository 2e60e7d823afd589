"""Report generation: MIMIC-CXR (R2Gen-style annotation) and MedPix single-image captions (RadFM)."""

from __future__ import annotations

import csv
from collections.abc import Iterable, Iterator
from pathlib import Path

from cmoe.errors import CMoEError
from cmoe.reference_models.unimed.data.loaders.common import (
    PathLike,
    _answer,
    _image,
    _missing,
    _read_json,
    _require,
    _root,
    _take,
)
from cmoe.reference_models.unimed.data.loaders.layouts import LAYOUTS
from cmoe.reference_models.unimed.data.sample import Sample

MIMIC_QUESTION = "Describe the given chest x-ray image in detail."
MEDPIX_QUESTION = "Describe this input image."


def _present_images(name: str, entries: Iterable[tuple[Path, str, str]], root: Path) -> Iterator[tuple[Path, str, str]]:
    """Entries whose image exists (the original silently keeps only those, which is how its "small" subsets
    work); raises when there were entries but none of their images exists, naming the first missing one."""
    first_missing = None
    found = False
    for image, rel, text in entries:
        if image.exists():
            found = True
            yield _image(name, image, root), rel, text
        elif first_missing is None:
            first_missing = image
    if first_missing is not None and not found:
        raise _missing(name, first_missing, root)


def _first_path(image_path: str | list[str]) -> str:
    """A study's first image (R2Gen lists every view; Uni-Med uses the first)."""
    return image_path if isinstance(image_path, str) else image_path[0]


def load_mimic_cxr(root: PathLike, split: str = "train", image_root: PathLike | None = None,
                   annotation: str = "annotation.json", eval_annotation: str | None = None,
                   limit: int | None = None) -> list[Sample]:
    """MIMIC-CXR report generation in the layout Uni-Med reads (R2Gen's ``annotation.json``).

    ``<root>/<annotation>`` is ``{"train"|"val"|"test": [{"image_path": [relative jpg, ...], "report": text,
    ...}]}``; each study uses its first image, at ``<image_root>/files/<relative jpg>`` (``image_root``
    defaults to ``root``; Uni-Med points it at MIMIC-CXR-JPG 2.0.0). Studies whose image is absent are
    skipped, as in the original. ``annotation`` selects a subset file (Uni-Med trains on
    ``annotation_small.json``); ``eval_annotation``, when set, is read for the ``val`` and ``test`` splits instead
    (the original trains on ``annotation_small.json`` and its ``eval_caption.py`` scores ``annotation.json``'s
    test split). Answer = the report collapsed to one line and cut to 50 words.
    """
    name = "mimic_cxr"
    root = _root(name, root, split, ("train", "val", "test"))
    images = Path(image_root).expanduser() if image_root is not None else root
    if split != "train" and eval_annotation is not None:
        annotation = eval_annotation
    data = _read_json(name, root / annotation, root, dict)
    if split not in data:
        raise CMoEError(f"{name}: {root / annotation} has no {split!r} list (keys: {sorted(data)}); "
                        f"expected {LAYOUTS[name]}")
    firsts = ((_first_path(row["image_path"]), row["report"]) for row in data[split] if row.get("image_path"))
    entries = ((images / "files" / rel, rel, report) for rel, report in firsts)
    samples = (Sample("report", {"question": MIMIC_QUESTION}, _answer(report), str(image), f"mimic_cxr/{rel}", name)
               for image, rel, report in _present_images(name, entries, root))
    return _take(name, samples, limit)


def load_medpix(root: PathLike, split: str = "train", image_root: PathLike | None = None,
                limit: int | None = None) -> list[Sample]:
    """MedPix single-image captions, RadFM's CSVs as Uni-Med reads them.

    ``<root>/MedPix_single_{train,test}.csv`` with columns ``name`` (image file), ``context`` (the caption)
    and ``type``; only ``type == "caption"`` rows with a name and a caption are kept, and only those whose
    image exists under ``image_root`` (default ``<root>/images``), as in the original.
    """
    name = "medpix"
    root = _root(name, root, split, ("train", "test"))
    images = Path(image_root).expanduser() if image_root is not None else root / "images"
    table = _require(name, root / f"MedPix_single_{split}.csv", root)

    def entries() -> Iterator[tuple[Path, str, str]]:
        with table.open(encoding="utf-8", newline="") as handle:
            reader = csv.DictReader(handle)
            absent = {"name", "context", "type"} - set(reader.fieldnames or ())
            if absent:
                raise CMoEError(f"{name}: {table} lacks columns {sorted(absent)}; expected {LAYOUTS[name]}")
            for row in reader:
                if row["type"] == "caption" and row["name"].strip() and row["context"].strip():
                    yield images / row["name"], row["name"], row["context"]

    samples = (Sample("report", {"question": MEDPIX_QUESTION}, _answer(caption), str(image), f"medpix/{rel}", name)
               for image, rel, caption in _present_images(name, entries(), root))
    return _take(name, samples, limit)
