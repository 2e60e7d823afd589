"""SA-Med2D-20M: REC/REG grounding pairs, from Uni-Med's processed per-image region files (``uni-med`` layout) or
from the release's masks and class mapping (``release``); the layout is detected from the files present.

The ``uni-med`` layout is read as the original's readers read it (``uni_med/datasets/datasets/sa_med_dataset.py``
``ReferSAMedDataset``/``InvReferSAMedDataset`` and their ``_Eval`` twins): every ``<modality>/<id>.json`` of
``regions_small_<split>/`` is a list of ``{object: [x, y, w, h]}`` entries (the first pair of each is used) on
the image ``images_small_<split>/<modality>/<id>.png``; object names go through the original's text processor
(whitespace collapsed, cut to 50 words, underscores kept). The original lists the folders in the file system's
order; we sort modalities and files by name (so the order is the same on every machine) and skip files that
are not ``.json`` (the original would fail on them).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from cmoe.errors import CMoEError, expect
from cmoe.reference_models.unimed.data.loaders.common import (
    PathLike,
    _check_layout,
    _grounding_sample,
    _image,
    _image_size,
    _log_layout,
    _malformed,
    _missing,
    _read_json,
    _require,
    _root,
    _take,
)
from cmoe.reference_models.unimed.data.loaders.layouts import AUTO, RELEASE, UNIMED
from cmoe.reference_models.unimed.data.sample import Sample

_UNIMED_SPLITS = ("train", "test")
_MAX_WORDS = 50


def samed2d_layout(root: PathLike, split: str = "train", layout: str = AUTO, annotation: str = "SAMed2D_v1.json",
                   name: str = "samed2d_rec") -> str:
    """The layout of the SA-Med2D folder `root` for `split`: `layout` unless it is ``auto``; else ``uni-med`` when
    ``<root>/regions_small_<split>/`` exists (for ``all``: either split's), ``release`` when ``<root>/<annotation>``
    does, and otherwise ``uni-med`` if the folder holds any ``regions_small_*`` folder, ``release`` if not. A folder
    with both is read as ``uni-med``, the original's."""
    _check_layout(name, layout)
    if layout != AUTO:
        return layout
    root = Path(root).expanduser()
    wanted = _UNIMED_SPLITS if split == "all" else (split,)
    if any((root / f"regions_small_{s}").is_dir() for s in wanted):
        return UNIMED
    if (root / annotation).is_file():
        return RELEASE
    return UNIMED if any((root / f"regions_small_{s}").is_dir() for s in _UNIMED_SPLITS) else RELEASE


def samed2d_markers(root: PathLike, split: str = "train", annotation: str = "SAMed2D_v1.json") -> dict[str, Path]:
    """What shows each layout for `split` (``all``: the training split's): ``<root>/regions_small_<split>/``
    (``uni-med``), ``<root>/<annotation>`` (``release``)."""
    root = Path(root).expanduser()
    return {UNIMED: root / f"regions_small_{'train' if split == 'all' else split}", RELEASE: root / annotation}


def _regions_unimed(name: str, task: str, root: Path, split: str) -> Iterator[Sample]:
    """The original's reading of ``regions_small_<split>`` / ``images_small_<split>``."""
    region_dir, image_dir = root / f"regions_small_{split}", root / f"images_small_{split}"
    if not region_dir.is_dir():
        raise _missing(name, region_dir, root)
    for modality in sorted(p.name for p in region_dir.iterdir() if p.is_dir()):
        for region_file in sorted(p for p in (region_dir / modality).iterdir() if p.suffix == ".json"):
            image_id = region_file.name[:-len(".json")]
            image = _image(name, image_dir / modality / f"{image_id}.png", root)
            size = _image_size(image, name)
            for region in _read_json(name, region_file, root, list):
                if not isinstance(region, dict) or not region:
                    raise _malformed(name, region_file,
                                     f"an entry is {region!r}, not a one-pair {{object: [x, y, w, h]}} mapping")
                obj, xywh = next(iter(region.items()))
                yield _grounding_sample(name, task, obj, xywh, size, image, f"samed2d/{image_id}", _MAX_WORDS,
                                        {"layout": UNIMED, "modality": modality})


def _samed2d_classes(name: str, root: Path) -> dict[str, dict[int, str]]:
    """``dataset → class id → class name`` from the class mapping (``{dataset: {name: id}}``; an
    ``{id: name}`` inner mapping is accepted too). ``union_*`` names lose to a plain name for the same id."""
    classes: dict[str, dict[int, str]] = {}
    for dataset, mapping in _read_json(name, root / "SAMed2D_v1_class_mapping_id.json", root, dict).items():
        by_id: dict[int, str] = {}
        for key, value in mapping.items():
            class_name, class_id = (value, key) if str(key).isdigit() and isinstance(value, str) else (key, value)
            try:
                class_id = int(class_id)
            except (TypeError, ValueError):
                continue
            if class_id not in by_id or by_id[class_id].startswith("union_"):
                by_id[class_id] = str(class_name)
        classes[dataset] = by_id
    return classes


def _samed2d_in_split(stem: str, split: str, test_fraction: float) -> bool:
    """Deterministic case-level split: all slices of one ``<modality>--<dataset>--<case>`` fall together."""
    if split == "all":
        return True
    case = "--".join(stem.split("--")[:3])
    in_test = int(hashlib.sha1(case.encode()).hexdigest(), 16) % 10_000 < test_fraction * 10_000
    return in_test == (split == "test")


def _mask_box(mask_path: Path) -> tuple[tuple[int, int, int, int], tuple[int, int]] | None:
    """``(x, y, w, h)`` of the mask's non-zero pixels and the mask's ``(width, height)``; None if empty."""
    from PIL import Image

    with Image.open(mask_path) as mask:
        pixels = np.asarray(mask)
    nonzero = pixels != 0 if pixels.ndim == 2 else (pixels != 0).any(axis=-1)
    rows, cols = np.flatnonzero(nonzero.any(axis=1)), np.flatnonzero(nonzero.any(axis=0))
    if rows.size == 0:
        return None
    x, y = int(cols[0]), int(rows[0])
    return (x, y, int(cols[-1]) - x + 1, int(rows[-1]) - y + 1), (nonzero.shape[1], nonzero.shape[0])


def _mask_class_id(name: str, mask_rel: str) -> int:
    """The class id of ``masks/<stem>--<class id>_<instance>.png``."""
    field = Path(mask_rel).stem.rsplit("--", 1)[-1].split("_")[0]
    if "--" not in mask_rel or not field.isdigit():
        raise CMoEError(f"{name}: cannot read a class id from mask name {mask_rel!r}; expected "
                        "<stem>--<class id>_<instance>.png, e.g. ct_00--AbdomenCT1K--Case_00011--x_0041--0000_001.png")
    return int(field)


def _samed2d_grounding(name: str, task: str, root: PathLike, split: str, annotation: str, test_fraction: float,
                       layout: str, limit: int | None) -> list[Sample]:
    root = _root(name, root, split, ("train", "test", "all"))
    expect(0.0 <= test_fraction <= 1.0, f"{name}: test_fraction", "a fraction in [0, 1]", test_fraction)
    found = samed2d_layout(root, split, layout, annotation, name)
    _log_layout(name, found, root, split)
    if found == UNIMED:
        splits = _UNIMED_SPLITS if split == "all" else (split,)
        return _take(name, (s for part in splits for s in _regions_unimed(name, task, root, part)), limit)
    image_masks: dict[str, list[str]] = _read_json(name, root / annotation, root, dict)
    classes = _samed2d_classes(name, root)

    def samples() -> Iterator[Sample]:
        for image_rel, mask_rels in image_masks.items():
            stem = Path(image_rel).stem
            if not _samed2d_in_split(stem, split, test_fraction):
                continue
            image = _image(name, root / image_rel, root)
            dataset = stem.split("--")[1] if "--" in stem else ""
            for mask_rel in mask_rels:
                class_name = classes.get(dataset, {}).get(_mask_class_id(name, mask_rel))
                found = _mask_box(_require(name, root / mask_rel, root)) if class_name else None
                if found is not None:
                    xywh, size = found
                    yield _grounding_sample(name, task, class_name.replace("_", " "), xywh, size, image,
                                            f"samed2d/{stem}", meta={"layout": RELEASE})

    return _take(name, samples(), limit)


def load_samed2d_rec(root: PathLike, split: str = "train", annotation: str = "SAMed2D_v1.json",
                     test_fraction: float = 0.1, layout: str = AUTO, limit: int | None = None) -> list[Sample]:
    """SA-Med2D-20M referring expression comprehension: one sample per (image, region).

    Layouts (``layout``: ``auto`` detects, see `samed2d_layout`). ``uni-med``: ``<root>`` holds Uni-Med's
    processed ``regions_small_{train,test}/<modality>/<id>.json`` (lists of ``{object: [x, y, w, h]}``, the first
    pair of each entry) and ``images_small_{train,test}/<modality>/<id>.png``; ``train``/``test`` read those
    folders, ``all`` both; the object name is kept as written, cut to 50 words; ``meta`` adds ``modality``.

    ``release``: ``<root>`` is the unpacked ``SAMed2Dv1`` folder. ``<root>/<annotation>`` maps
    ``images/<stem>.png`` to its masks ``masks/<stem>--<class id, 4 digits>_<instance, 3 digits>.png`` with
    ``<stem>`` = ``<modality>--<dataset>--<case>--<axis>_<slice>``; the object name is the class id looked up for
    ``<dataset>`` in ``SAMed2D_v1_class_mapping_id.json``, underscores read as spaces (masks whose id has no
    name, or with no foreground, are skipped). The box is the bounding box of the mask's non-zero pixels, on
    the mask's size. The release has no official split (Uni-Med's "small" subsets are the ``uni-med`` layout):
    ``train`` / ``test`` hash each case (all its slices together) to hold out ``test_fraction`` of cases;
    ``all`` keeps every image; ``annotation`` may name a subset file in the same format (``annotation`` and
    ``test_fraction`` apply to this layout only).

    Boxes become text as the original does (``int(v / size * 100)`` on the image's size); ``meta``: ``box``
    (`Box`), ``image_size``, ``object``, ``layout``.
    """
    return _samed2d_grounding("samed2d_rec", "rec", root, split, annotation, test_fraction, layout, limit)


def load_samed2d_reg(root: PathLike, split: str = "train", annotation: str = "SAMed2D_v1.json",
                     test_fraction: float = 0.1, layout: str = AUTO, limit: int | None = None) -> list[Sample]:
    """SA-Med2D-20M referring expression generation: box text in, object name out (see `load_samed2d_rec`)."""
    return _samed2d_grounding("samed2d_reg", "reg", root, split, annotation, test_fraction, layout, limit)
