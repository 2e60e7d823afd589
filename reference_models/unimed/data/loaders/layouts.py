"""The folder layout each loader expects, as one line of text: quoted by every data error and by `LOADERS`.

SLAKE (VQA, REC, REG) and SA-Med2D (REC, REG) each have two layouts, detected from the files present (a loader's
``layout`` option forces one): ``uni-med``, the processed folders the original Uni-Med code reads (its README
links them on figshare; its ``uni_med/configs/datasets/`` name the paths), and ``release``, the public release of
the dataset. The other datasets have one layout, which is also the one the original reads. `LAYOUT_CHOICES`
holds each layout on its own; `LAYOUTS` the one line per loader that error messages quote (both layouts where
there are two).
"""

from __future__ import annotations

from typing import NamedTuple

UNIMED = "uni-med"
"""The name of the processed layouts the original Uni-Med code reads (SLAKE, SA-Med2D)."""
RELEASE = "release"
"""The name of a dataset's public release layout (and of the only layout of the datasets that have one)."""
AUTO = "auto"
"""The ``layout`` option's default: detect the layout from the files present."""


class Layout(NamedTuple):
    """One folder layout a loader reads: its name, a one-line description, and whether the original reads it."""

    name: str
    description: str
    original: bool


_SLAKE_UNIMED = ("Uni-Med's processed Slake-VQA folder: <root>/{train,test}.txt (image folder names, e.g. xmlab102) "
                 "and <root>/imgs/<folder>/{question.json (lists of {img_name, question, answer, q_lang, "
                 "answer_type}), detection.json ([{organ: [x, y, w, h]}]), source.jpg}")
_SLAKE_RELEASE = ("the SLAKE 1.0 release: <root>/{train,validate,test}.json (lists of {img_name, question, answer, "
                  "q_lang, answer_type}) and <root>/imgs/xmlab<N>/{source.jpg,detection.json}")
_SAMED2D_UNIMED = ("Uni-Med's processed SA-Med2D-20M folders: <root>/regions_small_{train,test}/<modality>/<id>.json "
                   "([{object: [x, y, w, h]}]) and <root>/images_small_{train,test}/<modality>/<id>.png")
_SAMED2D_RELEASE = ("the SA-Med2D-20M SAMed2Dv1 folder: <root>/SAMed2D_v1.json {\"images/<stem>.png\": "
                    "[\"masks/<stem>--<class id>_<instance>.png\", ...]}, <root>/SAMed2D_v1_class_mapping_id.json "
                    "{dataset: {class name: class id}}, <root>/images/, <root>/masks/")
_MEDMNIST = ("the MedMNIST v2 file <root>/{flag}_224.npz (or {flag}.npz, {flag}_<size>.npz) with "
             "{{train,val,test}}_images and {{train,val,test}}_labels")

_SLAKE = (Layout(UNIMED, _SLAKE_UNIMED, True), Layout(RELEASE, _SLAKE_RELEASE, False))
_SAMED2D = (Layout(UNIMED, _SAMED2D_UNIMED, True), Layout(RELEASE, _SAMED2D_RELEASE, False))


def _one(description: str) -> tuple[Layout, ...]:
    return (Layout(RELEASE, description, True),)


LAYOUT_CHOICES: dict[str, tuple[Layout, ...]] = {
    "medqa": _one("the MedQA release: <root>/questions/US/{train,dev,test}.jsonl, one {question, answer, options, "
                  "answer_idx} object per line"),
    "pubmedqa": _one("PubMedQA PQA-L: <root>/ori_pqal.json {pmid: {QUESTION, final_decision, ...}} with "
                     "<root>/test_ground_truth.json {pmid: answer}, or the official split script's "
                     "<root>/pqal_fold<k>/{train,dev}_set.json (or <root>/{train,dev}_set.json, which Uni-Med reads) "
                     "and <root>/test_set.json"),
    "slake_vqa": _SLAKE,
    "slake_rec": _SLAKE,
    "slake_reg": _SLAKE,
    "pathvqa": _one("the Path-VQA release: <root>/qas/{train,val,test}_vqa.pkl (or <root>/qas/<split>/<split>_qa.pkl) "
                    "and <root>/images/<split>/<img_id>.jpg"),
    "mimic_cxr": _one("R2Gen-style MIMIC-CXR captions: <root>/annotation.json (Uni-Med: annotation_small.json) "
                      "{train,val,test: [{image_path: [relative path, ...], report}]} and images at <image_root, "
                      "default root>/files/<relative path>"),
    "medpix": _one("RadFM's MedPix single-image captions: <root>/MedPix_single_{train,test}.csv (columns name, "
                   "context, type) and images at <image_root, default root/images>/<name>"),
    "samed2d_rec": _SAMED2D,
    "samed2d_reg": _SAMED2D,
    "dermamnist": _one(_MEDMNIST.format(flag="dermamnist")),
    "organsmnist": _one(_MEDMNIST.format(flag="organsmnist")),
}
"""Every layout each loader reads, the one the original reads first."""


def _line(choices: tuple[Layout, ...]) -> str:
    if len(choices) == 1:
        return choices[0].description
    return "either " + " or ".join(f"({layout.name} layout) {layout.description}" for layout in choices)


LAYOUTS: dict[str, str] = {name: _line(choices) for name, choices in LAYOUT_CHOICES.items()}
"""One line per loader describing the layout(s) it reads; data errors quote it."""
