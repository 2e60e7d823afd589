"""Loaders for the public datasets Uni-Med trains and evaluates on, read from a local data root (no downloads);
one module per dataset family (`qa`, `slake`, `pathvqa`, `reports`, `samed2d`, `medmnist`), the helpers they
share in `common`, the folder layouts in `layouts`. To add a dataset: a ``load_<name>`` in its family's module
(or a new one), its layout in `layouts`, and a line in `_FUNCTIONS` below.

Every loader is ``load_<name>(root, split="train", **options) -> list[Sample]`` and takes ``limit`` (keep the
first N samples; loading stops there, so small evaluations stay cheap). `LOADERS` maps each name to its
function, its task and a one-line description of the folder layout(s) it expects; `load_dataset` dispatches by
name. SLAKE and SA-Med2D read two layouts, Uni-Med's processed folders (``uni-med``) and the public release
(``release``), detected from the files present (option ``layout`` forces one); `detect_layout` names the one a
root is in, and their samples carry it in ``meta["layout"]`` (see `layouts`).

Every problem with the data raises a `DataError` (a `CMoEError`) naming the file: `MissingDataError` for a
missing file (with the expected layout; its ``path`` is the file that would fix it), `MalformedDataError` for a
file that is not what the layout says (JSON that does not parse, a record without a key, a label out of range,
an ``.npz`` that is not one, a file that is not an image); a bad split lists the valid ones and an unknown
option the accepted ones. Pickled annotations (Path-VQA) are read by a restricted unpickler that builds only
plain containers, strings and numbers, so a pickle can never run code.

Text follows the original's ``blip_caption_new`` processor: answers (and reports) are whitespace-collapsed
and cut to 50 words (`clean_answer`); the QA loaders cut the question so the whole instruction has at most
``instruction_words`` (50) words, as the original does (``null`` keeps long MedQA questions whole); the
``uni-med`` layouts cut questions and object names to 50 words as the original; the other loaders only collapse
their whitespace (their questions are shorter than 50 words). Image tasks keep the image as a file path
(MedMNIST: a uint8 array); ``image_id`` is ``"<dataset>/<image>"``, stable across the tasks built from one image
(SLAKE VQA/REC/REG share ids) and across layouts, for IMAX grouping.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from cmoe.errors import CMoEError, UnknownNameError
from cmoe.reference_models.unimed.data.loaders.common import DataError, MalformedDataError, MissingDataError, PathLike
from cmoe.reference_models.unimed.data.loaders.layouts import AUTO, LAYOUT_CHOICES, LAYOUTS, RELEASE, UNIMED, Layout
from cmoe.reference_models.unimed.data.loaders.medmnist import load_dermamnist, load_organsmnist
from cmoe.reference_models.unimed.data.loaders.pathvqa import load_pathvqa
from cmoe.reference_models.unimed.data.loaders.qa import load_medqa, load_pubmedqa
from cmoe.reference_models.unimed.data.loaders.reports import (
    MEDPIX_QUESTION,
    MIMIC_QUESTION,
    load_medpix,
    load_mimic_cxr,
)
from cmoe.reference_models.unimed.data.loaders.samed2d import (
    load_samed2d_rec,
    load_samed2d_reg,
    samed2d_layout,
    samed2d_markers,
)
from cmoe.reference_models.unimed.data.loaders.slake import (
    load_slake_rec,
    load_slake_reg,
    load_slake_vqa,
    slake_layout,
    slake_markers,
)
from cmoe.reference_models.unimed.data.sample import Sample


class Loader(NamedTuple):
    """A registered loader: the function, the task its samples have, and the folder layout it expects."""

    function: Callable[..., list[Sample]]
    task: str
    layout: str


_FUNCTIONS: dict[str, tuple[Callable[..., list[Sample]], str]] = {
    "medqa": (load_medqa, "qa"),
    "pubmedqa": (load_pubmedqa, "qa"),
    "slake_vqa": (load_slake_vqa, "vqa"),
    "slake_rec": (load_slake_rec, "rec"),
    "slake_reg": (load_slake_reg, "reg"),
    "pathvqa": (load_pathvqa, "vqa"),
    "mimic_cxr": (load_mimic_cxr, "report"),
    "medpix": (load_medpix, "report"),
    "samed2d_rec": (load_samed2d_rec, "rec"),
    "samed2d_reg": (load_samed2d_reg, "reg"),
    "dermamnist": (load_dermamnist, "cls"),
    "organsmnist": (load_organsmnist, "cls"),
}

LOADERS: dict[str, Loader] = {name: Loader(function, task, LAYOUTS[name])
                              for name, (function, task) in _FUNCTIONS.items()}


def _check_options(name: str, options: dict[str, Any]) -> None:
    if name not in LOADERS:
        raise UnknownNameError("dataset", name, LOADERS)
    accepted = [p for p in inspect.signature(LOADERS[name].function).parameters if p not in ("root", "split")]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise CMoEError(f"{name}: unknown option(s) {unknown}; {name} accepts {', '.join(accepted)} "
                        "(check the dataset entry's options in the config)")


def load_dataset(name: str, root: PathLike, split: str = "train", /, **options: Any) -> list[Sample]:
    """The samples of dataset `name` (a key of `LOADERS`) read from `root`, with that loader's `options`."""
    _check_options(name, options)
    return LOADERS[name].function(root, split, **options)


def detect_layout(name: str, root: PathLike, split: str = "train", /, **options: Any) -> Layout:
    """The layout dataset `name` reads (or would read) under `root` for `split` with its loader's `options`:
    detected from the files present for SLAKE and SA-Med2D (or the one their ``layout`` option forces), the only
    one for the other datasets. Reads no annotation file."""
    _check_options(name, options)
    layout = options.get("layout", AUTO)
    if name.startswith("slake_"):
        found = slake_layout(root, split, layout, name)
    elif name.startswith("samed2d_"):
        found = samed2d_layout(root, split, layout, options.get("annotation", "SAMed2D_v1.json"), name)
    else:
        found = RELEASE
    return next(choice for choice in LAYOUT_CHOICES[name] if choice.name == found)


def layout_markers(name: str, root: PathLike, split: str = "train", /, **options: Any) -> dict[str, Path]:
    """For a dataset with several layouts, the file or folder whose presence shows each one for `split` (the
    detection `detect_layout` makes); empty for the others. When none is present, the folder is in no layout."""
    _check_options(name, options)
    if name.startswith("slake_"):
        return slake_markers(root, split)
    if name.startswith("samed2d_"):
        return samed2d_markers(root, split, options.get("annotation", "SAMed2D_v1.json"))
    return {}


__all__ = ["AUTO", "DataError", "LAYOUTS", "LAYOUT_CHOICES", "LOADERS", "Layout", "Loader", "MEDPIX_QUESTION",
           "MIMIC_QUESTION", "MalformedDataError", "MissingDataError", "RELEASE", "UNIMED", "detect_layout",
           "layout_markers", "load_dataset", "load_dermamnist", "load_medpix", "load_medqa", "load_mimic_cxr",
           "load_organsmnist", "load_pathvqa", "load_pubmedqa", "load_samed2d_rec", "load_samed2d_reg",
           "load_slake_rec", "load_slake_reg", "load_slake_vqa"]
