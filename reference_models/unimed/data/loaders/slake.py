"""SLAKE 1.0: VQA (English questions) and the REC/REG grounding pairs from its detection boxes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cmoe.reference_models.unimed.data.loaders.common import (
    PathLike,
    _answer,
    _grounding_sample,
    _image,
    _image_size,
    _read_json,
    _root,
    _take,
    _words,
)
from cmoe.reference_models.unimed.data.sample import Sample

_SLAKE_SPLITS = ("train", "validate", "test")


def _slake_rows(name: str, root: PathLike, split: str) -> tuple[Path, list[dict[str, Any]]]:
    root = _root(name, root, split, _SLAKE_SPLITS)
    return root, _read_json(name, root / f"{split}.json", root, list)


def _slake_image(name: str, root: Path, img_name: str) -> tuple[Path, str]:
    path = _image(name, root / "imgs" / img_name, root)
    return path, f"slake/{Path(img_name).parent.as_posix()}"


def load_slake_vqa(root: PathLike, split: str = "train", limit: int | None = None) -> list[Sample]:
    """SLAKE 1.0 English VQA: ``q_lang == "en"`` questions with a non-empty answer (as Uni-Med).

    Layout: ``<root>/{train,validate,test}.json`` (lists of ``{img_id, img_name, question, answer, q_lang,
    answer_type, ...}``) and ``<root>/imgs/<img_name>`` (e.g. ``imgs/xmlab102/source.jpg``). ``meta``:
    ``answer_type`` ``"open"``/``"closed"`` (lower-cased from OPEN/CLOSED) and ``qid``.
    """
    name = "slake_vqa"
    root, rows = _slake_rows(name, root, split)

    def samples() -> Iterator[Sample]:
        for row in rows:
            if row.get("q_lang") != "en" or not str(row.get("answer", "")).strip():
                continue
            image, image_id = _slake_image(name, root, row["img_name"])
            yield Sample("vqa", {"question": _words(row["question"])}, _answer(row["answer"]), str(image),
                         image_id, name, {"answer_type": str(row["answer_type"]).lower(), "qid": row.get("qid")})

    return _take(name, samples(), limit)


def _slake_grounding(name: str, task: str, root: PathLike, split: str, limit: int | None) -> list[Sample]:
    root, rows = _slake_rows(name, root, split)
    img_names = list(dict.fromkeys(row["img_name"] for row in rows))

    def samples() -> Iterator[Sample]:
        for img_name in img_names:
            image, image_id = _slake_image(name, root, img_name)
            detection = image.parent / "detection.json"
            if not detection.exists():
                continue
            size = _image_size(image, name)
            for region in _read_json(name, detection, root, list):
                for obj, xywh in region.items():
                    yield _grounding_sample(name, task, obj, xywh, size, image, image_id)

    return _take(name, samples(), limit)


def load_slake_rec(root: PathLike, split: str = "train", limit: int | None = None) -> list[Sample]:
    """SLAKE referring expression comprehension: one sample per (image, organ box) of ``detection.json``.

    The images of a split are the distinct ``img_name``s of ``<root>/<split>.json`` (in order of first use;
    Uni-Med used its own unpublished ``train.txt``/``test.txt`` lists). ``detection.json`` is a list of
    ``{organ name: [x, y, w, h]}`` in pixels; images without one give no samples. Answer = the box text
    (`encode_box` on the size read from the image); ``meta``: ``box`` (`Box`), ``image_size``, ``object``.
    """
    return _slake_grounding("slake_rec", "rec", root, split, limit)


def load_slake_reg(root: PathLike, split: str = "train", limit: int | None = None) -> list[Sample]:
    """SLAKE referring expression generation: the box text in the instruction, answer = the organ name.

    Same images, boxes and ``meta`` as `load_slake_rec`.
    """
    return _slake_grounding("slake_reg", "reg", root, split, limit)
