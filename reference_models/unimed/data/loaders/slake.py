"""SLAKE 1.0: VQA (English questions) and the REC/REG grounding pairs from its detection boxes, in Uni-Med's
processed layout (``uni-med``: ``train.txt``/``test.txt`` image lists over ``imgs/<folder>/``) or the official
release's (``release``: ``train.json``/``validate.json``/``test.json``); the layout is detected from the files.

The ``uni-med`` layout is read as the original's readers read it (``uni_med/datasets/datasets/slake_vqa_dataset.py``
``SlakeVQADataset``, ``slake_dataset.py`` ``ReferSlakeDataset``/``InvReferSlakeDataset`` and their ``_Eval``
twins, ``eval_vqa.py``): the images of a split are the folder names in ``<split>.txt`` (whitespace-separated),
in that order; VQA takes each folder's ``question.json`` rows with ``q_lang == "en"`` and a non-empty answer, the
image at ``imgs/<img_name>``; REC/REG take each folder's ``detection.json``, the first ``{object: box}`` pair of
each entry, on ``imgs/<folder>/source.jpg``. Questions, object names and answers go through the original's text
processor (whitespace collapsed, cut to 50 words). Where our readings differ from the original on the same files:
a whitespace-only answer is dropped (the original trains on it as an empty answer) and the ``release`` layout
keeps every pair of a detection entry (the original reads the first; SLAKE's entries hold one) and skips
images without ``detection.json`` (the original's ``uni-med`` reader, like ours, needs one per listed image).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cmoe.errors import CMoEError
from cmoe.reference_models.unimed.data.loaders.common import (
    PathLike,
    _answer,
    _check_layout,
    _grounding_sample,
    _image,
    _image_size,
    _log_layout,
    _malformed,
    _missing,
    _read_json,
    _root,
    _take,
    _words,
)
from cmoe.reference_models.unimed.data.loaders.layouts import AUTO, RELEASE, UNIMED
from cmoe.reference_models.unimed.data.sample import Sample

_SLAKE_SPLITS = ("train", "validate", "test")
_UNIMED_SPLITS = ("train", "test")
_MAX_WORDS = 50


def slake_layout(root: PathLike, split: str = "train", layout: str = AUTO, name: str = "slake_vqa") -> str:
    """The layout of the SLAKE folder `root` for `split`: `layout` unless it is ``auto``; else ``uni-med`` when
    ``<root>/<split>.txt`` exists, ``release`` when ``<root>/<split>.json`` does, and otherwise ``uni-med`` if the
    folder holds another split's ``.txt`` list, ``release`` if not (so a missing file is named in the layout the
    folder is in). A folder with both files is read as ``uni-med``, the original's."""
    _check_layout(name, layout)
    if layout != AUTO:
        return layout
    root = Path(root).expanduser()
    if (root / f"{split}.txt").is_file():
        return UNIMED
    if (root / f"{split}.json").is_file():
        return RELEASE
    return UNIMED if any((root / f"{s}.txt").is_file() for s in _UNIMED_SPLITS) else RELEASE


def slake_markers(root: PathLike, split: str = "train") -> dict[str, Path]:
    """The file that shows each layout for `split`: ``<root>/<split>.txt`` (``uni-med``), ``<root>/<split>.json``
    (``release``)."""
    root = Path(root).expanduser()
    return {UNIMED: root / f"{split}.txt", RELEASE: root / f"{split}.json"}


def _open(name: str, root: PathLike, split: str, layout: str) -> tuple[Path, str]:
    """The checked root and its layout for `split` (logged)."""
    path = _root(name, root, split, _SLAKE_SPLITS)
    found = slake_layout(path, split, layout, name)
    if found == UNIMED and split not in _UNIMED_SPLITS:
        raise CMoEError(f"{name}: the uni-med layout has no {split!r} split (only {', '.join(_UNIMED_SPLITS)}: "
                        f"train.txt, test.txt in {path}); use train or test, or the release layout's {split}.json")
    _log_layout(name, found, path, split)
    return path, found


def _folders(name: str, root: Path, split: str) -> list[str]:
    """The image folder names listed in ``<root>/<split>.txt`` (whitespace-separated, as the original splits it)."""
    path = root / f"{split}.txt"
    if not path.is_file():
        raise _missing(name, path, root)
    try:
        return path.read_text(encoding="utf-8").split()
    except UnicodeDecodeError as error:
        raise _malformed(name, path, f"not UTF-8 text ({error.reason} at byte {error.start})") from None


def _slake_rows(name: str, root: Path, split: str) -> list[dict[str, Any]]:
    return _read_json(name, root / f"{split}.json", root, list)


def _slake_image(name: str, root: Path, img_name: str) -> tuple[Path, str]:
    path = _image(name, root / "imgs" / img_name, root)
    return path, f"slake/{Path(img_name).parent.as_posix()}"


def _english(row: dict[str, Any]) -> bool:
    """An English question with a non-empty answer (the original's filter; whitespace-only answers dropped too)."""
    return row.get("q_lang") == "en" and bool(str(row.get("answer", "")).strip())


def load_slake_vqa(root: PathLike, split: str = "train", layout: str = AUTO,
                   limit: int | None = None) -> list[Sample]:
    """SLAKE English VQA: ``q_lang == "en"`` questions with a non-empty answer (as Uni-Med).

    Layouts (``layout``: ``auto`` detects, see `slake_layout`): ``uni-med`` — the folders listed in
    ``<root>/{train,test}.txt``, their questions in ``<root>/imgs/<folder>/question.json``, questions and answers
    cut to 50 words as the original's text processor does; ``release`` — ``<root>/{train,validate,test}.json``
    (lists of ``{img_id, img_name, question, answer, q_lang, answer_type, ...}``), questions whitespace-collapsed.
    Image: ``<root>/imgs/<img_name>`` (e.g. ``imgs/xmlab102/source.jpg``). ``meta``: ``answer_type``
    ``"open"``/``"closed"`` (lower-cased from OPEN/CLOSED), ``qid`` and ``layout``.
    """
    name = "slake_vqa"
    root, found = _open(name, root, split, layout)

    def rows() -> Iterator[dict[str, Any]]:
        if found == RELEASE:
            yield from _slake_rows(name, root, split)
            return
        for folder in _folders(name, root, split):
            yield from _read_json(name, root / "imgs" / folder / "question.json", root, list)

    question = _words if found == RELEASE else _answer

    def samples() -> Iterator[Sample]:
        for row in rows():
            if not _english(row):
                continue
            image, image_id = _slake_image(name, root, row["img_name"])
            yield Sample("vqa", {"question": question(row["question"])}, _answer(row["answer"]), str(image),
                         image_id, name, {"answer_type": str(row["answer_type"]).lower(), "qid": row.get("qid"),
                                          "layout": found})

    return _take(name, samples(), limit)


def _grounding_unimed(name: str, task: str, root: Path, split: str) -> Iterator[Sample]:
    for folder in _folders(name, root, split):
        image = _image(name, root / "imgs" / folder / "source.jpg", root)
        size = _image_size(image, name)
        for region in _read_json(name, root / "imgs" / folder / "detection.json", root, list):
            if not isinstance(region, dict) or not region:
                raise _malformed(name, root / "imgs" / folder / "detection.json",
                                 f"an entry is {region!r}, not a one-pair {{object: [x, y, w, h]}} mapping")
            obj, xywh = next(iter(region.items()))
            yield _grounding_sample(name, task, obj, xywh, size, image, f"slake/{folder}", _MAX_WORDS,
                                    {"layout": UNIMED})


def _grounding_release(name: str, task: str, root: Path, split: str) -> Iterator[Sample]:
    img_names = list(dict.fromkeys(row["img_name"] for row in _slake_rows(name, root, split)))
    for img_name in img_names:
        image, image_id = _slake_image(name, root, img_name)
        detection = image.parent / "detection.json"
        if not detection.exists():
            continue
        size = _image_size(image, name)
        for region in _read_json(name, detection, root, list):
            for obj, xywh in region.items():
                yield _grounding_sample(name, task, obj, xywh, size, image, image_id, meta={"layout": RELEASE})


def _slake_grounding(name: str, task: str, root: PathLike, split: str, layout: str,
                     limit: int | None) -> list[Sample]:
    root, found = _open(name, root, split, layout)
    read = _grounding_unimed if found == UNIMED else _grounding_release
    return _take(name, read(name, task, root, split), limit)


def load_slake_rec(root: PathLike, split: str = "train", layout: str = AUTO,
                   limit: int | None = None) -> list[Sample]:
    """SLAKE referring expression comprehension: one sample per (image, organ box) of ``detection.json``.

    ``uni-med`` layout: the folders of ``<root>/<split>.txt``, each with ``imgs/<folder>/detection.json`` (needed)
    and ``source.jpg``; the first ``{organ: [x, y, w, h]}`` pair of each entry; the organ name cut to 50 words.
    ``release`` layout: the distinct ``img_name``s of ``<root>/<split>.json`` (in order of first use), every pair
    of each entry; images without ``detection.json`` give no samples. Boxes are in pixels; answer = the box text
    (``int(v / size * 100)`` on the size read from the image, as the original); ``meta``: ``box`` (`Box`),
    ``image_size``, ``object``, ``layout``.
    """
    return _slake_grounding("slake_rec", "rec", root, split, layout, limit)


def load_slake_reg(root: PathLike, split: str = "train", layout: str = AUTO,
                   limit: int | None = None) -> list[Sample]:
    """SLAKE referring expression generation: the box text in the instruction, answer = the organ name.

    Same layouts, images, boxes and ``meta`` as `load_slake_rec`.
    """
    return _slake_grounding("slake_reg", "reg", root, split, layout, limit)
