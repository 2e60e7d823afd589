"""Loaders for the public datasets Uni-Med trains and evaluates on, read from a local data root (no downloads).

Every loader is ``load_<name>(root, split="train", **options) -> list[Sample]`` and takes ``limit`` (keep the
first N samples; loading stops there, so small evaluations stay cheap). `LOADERS` maps each name to its
function, its task and a one-line description of the folder layout it expects; `load_dataset` dispatches by
name. Every problem with the data raises a `DataError` (a `CMoEError`) naming the file: `MissingDataError` for a
missing file (with the expected layout), `MalformedDataError` for a file that is not what the layout says (JSON
that does not parse, a record without a key, a label out of range, an ``.npz`` that is not one, a file that is
not an image); a bad split lists the valid ones and an unknown option the accepted ones. Pickled annotations
(Path-VQA) are read by a restricted unpickler that builds only plain containers, strings and numbers, so a
pickle can never run code.

Text follows the original's ``blip_caption_new`` processor: answers (and reports) are whitespace-collapsed
and cut to 50 words (`clean_answer`); questions and object names are only whitespace-collapsed (the original
also cuts the whole instruction to 50 words, which truncates long MedQA questions; we do not). Image tasks
keep the image as a file path (MedMNIST: a uint8 array); ``image_id`` is ``"<dataset>/<image>"``, stable
across the tasks built from one image (SLAKE VQA/REC/REG share ids), for IMAX grouping.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import inspect
import io
import itertools
import json
import pickle
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple, Union

import numpy as np

from cmoe.errors import CMoEError, UnknownNameError, expect, unset_variables_hint
from cmoe.reference_models.unimed.boxes import encode_box, parse_box
from cmoe.reference_models.unimed.data.medmnist_classes import OFFICIAL_LABELS, QUESTIONS, answer_name
from cmoe.reference_models.unimed.data.sample import Sample
from cmoe.reference_models.unimed.prompts import clean_answer

PathLike = Union[str, Path]

MIMIC_QUESTION = "Describe the given chest x-ray image in detail."
MEDPIX_QUESTION = "Describe this input image."

_SLAKE = ("the SLAKE 1.0 release: <root>/{train,validate,test}.json (lists of {img_name, question, answer, "
          "q_lang, answer_type}) and <root>/imgs/xmlab<N>/{source.jpg,detection.json}")
_SAMED2D = ("the SA-Med2D-20M SAMed2Dv1 folder: <root>/SAMed2D_v1.json {\"images/<stem>.png\": "
            "[\"masks/<stem>--<class id>_<instance>.png\", ...]}, <root>/SAMed2D_v1_class_mapping_id.json "
            "{dataset: {class name: class id}}, <root>/images/, <root>/masks/")
_MEDMNIST = ("the MedMNIST v2 file <root>/{flag}_224.npz (or {flag}.npz, {flag}_<size>.npz) with "
             "{{train,val,test}}_images and {{train,val,test}}_labels")

LAYOUTS: dict[str, str] = {
    "medqa": ("the MedQA release: <root>/questions/US/{train,dev,test}.jsonl, one {question, answer, options, "
              "answer_idx} object per line"),
    "pubmedqa": ("PubMedQA PQA-L: <root>/ori_pqal.json {pmid: {QUESTION, final_decision, ...}} with "
                 "<root>/test_ground_truth.json {pmid: answer}, or the official split script's "
                 "<root>/pqal_fold<k>/{train,dev}_set.json and <root>/test_set.json"),
    "slake_vqa": _SLAKE,
    "slake_rec": _SLAKE,
    "slake_reg": _SLAKE,
    "pathvqa": ("the Path-VQA release: <root>/qas/{train,val,test}_vqa.pkl (or <root>/qas/<split>/<split>_qa.pkl) "
                "and <root>/images/<split>/<img_id>.jpg"),
    "mimic_cxr": ("R2Gen-style MIMIC-CXR captions: <root>/annotation.json {train,val,test: [{image_path: "
                  "[relative path, ...], report}]} and images at <image_root, default root>/files/<relative path>"),
    "medpix": ("RadFM's MedPix single-image captions: <root>/MedPix_single_{train,test}.csv (columns name, context, "
               "type) and images at <image_root, default root/images>/<name>"),
    "samed2d_rec": _SAMED2D,
    "samed2d_reg": _SAMED2D,
    "dermamnist": _MEDMNIST.format(flag="dermamnist"),
    "organsmnist": _MEDMNIST.format(flag="organsmnist"),
}


class Loader(NamedTuple):
    """A registered loader: the function, the task its samples have, and the folder layout it expects."""

    function: Callable[..., list[Sample]]
    task: str
    layout: str


class DataError(CMoEError):
    """A dataset that cannot be read as its loader's layout describes; the message names the file."""


class MissingDataError(DataError):
    """A file or folder the layout needs is absent."""


class MalformedDataError(DataError):
    """A file is present but its contents are not what the layout describes."""


# --- shared helpers -------------------------------------------------------------------------------------------


def _missing(name: str, path: Path, root: Path) -> CMoEError:
    return MissingDataError(f"{name}: missing {path}{unset_variables_hint(path)}; expected {LAYOUTS[name]} "
                            f"(root = {root})")


def _malformed(name: str, path: Path | str, problem: str) -> MalformedDataError:
    return MalformedDataError(f"{name}: {path}: {problem}; expected {LAYOUTS[name]}. Fix or replace the file")


class _Record(dict):
    """A record of an annotation file: a missing key raises `MalformedDataError` naming the file and record."""

    __slots__ = ("_where",)

    def __missing__(self, key: object) -> Any:
        name, path, index = self._where
        raise _malformed(name, path, f"record {index} has no key {key!r} (keys: {sorted(map(str, self))[:8]})")


def _records(value: Any, name: str, path: Path, index: object = "") -> Any:
    """`value` with every mapping turned into a `_Record` that knows its file and position."""
    if isinstance(value, dict):
        record = _Record({k: _records(v, name, path, f"{index}.{k}" if index != "" else k) for k, v in value.items()})
        record._where = (name, path, index if index != "" else "(top level)")
        return record
    if isinstance(value, list):
        return [_records(v, name, path, f"{index}[{i}]" if index != "" else i) for i, v in enumerate(value)]
    return value


def _require(name: str, path: Path, root: Path) -> Path:
    """`path` if it exists, else the `CMoEError` naming it and the expected layout."""
    if not path.exists():
        raise _missing(name, path, root)
    return path


def _root(name: str, root: PathLike, split: str, valid: Iterable[str]) -> Path:
    """The data root as a `Path`, after checking `split` is one of `valid` and the root is a directory."""
    _check_split(name, split, valid)
    path = Path(root).expanduser()
    if not path.is_dir():
        raise CMoEError(f"{name}: data root {path} is not a directory{unset_variables_hint(path)}; expected "
                        f"{LAYOUTS[name]}")
    return path


def _check_split(name: str, split: str, valid: Iterable[str]) -> None:
    valid = tuple(valid)
    if split not in valid:
        raise CMoEError(f"{name}: unknown split {split!r}; valid splits: {', '.join(valid)} (use one of them)")


def _check_limit(name: str, limit: int | None) -> None:
    expect(limit is None or (isinstance(limit, int) and limit >= 0), f"{name}: limit",
           "None or a non-negative int", repr(limit))


def _take(name: str, samples: Iterator[Sample], limit: int | None) -> list[Sample]:
    """The first `limit` samples (all when None), consuming no more of the iterator than needed."""
    _check_limit(name, limit)
    try:
        return list(itertools.islice(samples, limit))
    except (KeyError, IndexError, TypeError, AttributeError) as error:
        raise MalformedDataError(f"{name}: a record is not in the expected form ({type(error).__name__}: {error}); "
                                 f"expected {LAYOUTS[name]}. Fix or replace the annotation file") from error


def _words(value: object) -> str:
    """Whitespace collapsed (questions, object names)."""
    return " ".join(str(value).split())


def _answer(value: object) -> str:
    """The original's answer clean-up: whitespace collapsed and cut to 50 words."""
    return clean_answer(str(value))


def _read_json(name: str, path: Path, root: Path, kind: type | None = None) -> Any:
    """The JSON value in `path` (its mappings as `_Record`s); `kind` (dict or list) is the top-level type the
    layout needs."""
    try:
        with _require(name, path, root).open(encoding="utf-8") as handle:
            value = json.load(handle)
    except json.JSONDecodeError as error:
        raise _malformed(name, path, f"not valid JSON (line {error.lineno}, column {error.colno}: {error.msg})") \
            from None
    except UnicodeDecodeError as error:
        raise _malformed(name, path, f"not UTF-8 text ({error.reason} at byte {error.start})") from None
    if kind is not None and not isinstance(value, kind):
        raise _malformed(name, path, f"the top level is a JSON {type(value).__name__}, not a "
                                     f"{'JSON object' if kind is dict else 'JSON list'}")
    return _records(value, name, path)


def _read_jsonl(name: str, path: Path, root: Path) -> list[dict[str, Any]]:
    rows = []
    try:
        with _require(name, path, root).open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    raise _malformed(name, path, f"line {number} is not valid JSON ({error.msg})") from None
                if not isinstance(row, dict):
                    raise _malformed(name, path, f"line {number} is a JSON {type(row).__name__}, not an object")
                rows.append(_records(row, name, path, f"line {number}"))
    except UnicodeDecodeError as error:
        raise _malformed(name, path, f"not UTF-8 text ({error.reason} at byte {error.start})") from None
    if not rows:
        raise _malformed(name, path, "holds no records (the file is empty)")
    return rows


@functools.lru_cache(maxsize=65536)
def _image_header(path: Path) -> tuple[int, int] | str:
    """``(width, height)`` from an image file's header (no pixel decoding), or why it is not an image."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.size
    except (UnidentifiedImageError, OSError, ValueError) as error:
        return f"not an image Pillow can read ({type(error).__name__}: {error})"


def _image(name: str, path: Path, root: Path) -> Path:
    """`path` if it exists and is an image file (checked now, not when a batch is collated)."""
    header = _image_header(_require(name, path, root))
    if isinstance(header, str):
        raise _malformed(name, path, header)
    return path


def _image_size(path: Path, name: str = "image") -> tuple[int, int]:
    """``(width, height)`` from the image header (Pillow opens lazily, no pixel decoding)."""
    header = _image_header(path)
    if isinstance(header, str):
        raise MalformedDataError(f"{name}: {path}: {header}; replace the file with the image")
    return header


def _box_meta(xywh: Iterable[float], width: int, height: int) -> tuple[str, dict[str, Any]]:
    """The box text and the meta REC/REG evaluation needs (`Box`, image size)."""
    text = encode_box(tuple(float(v) for v in xywh), width, height)
    return text, {"box": parse_box(text), "image_size": (width, height)}


def _grounding_sample(name: str, task: str, obj: str, xywh: Iterable[float], size: tuple[int, int],
                      image: Path, image_id: str) -> Sample:
    """A REC sample (object → box) or a REG sample (box → object) for one object of one image."""
    box_text, meta = _box_meta(xywh, *size)
    obj = _words(obj)
    meta["object"] = obj
    if task == "rec":
        return Sample("rec", {"object": obj}, box_text, str(image), image_id, name, meta)
    return Sample("reg", {"box": box_text}, _answer(obj), str(image), image_id, name, meta)


# --- question answering ---------------------------------------------------------------------------------------


def load_medqa(root: PathLike, split: str = "train", limit: int | None = None) -> list[Sample]:
    """MedQA (USMLE, English): the question alone, no options (as Uni-Med), answer = the answer text.

    Layout: ``<root>/questions/US/{train,dev,test}.jsonl`` of the official release (``data_clean`` folder),
    one ``{"question", "answer", "options", "answer_idx", ...}`` object per line. ``meta`` keeps ``options``
    and ``answer_idx`` for a multiple-choice evaluation.
    """
    name = "medqa"
    root = _root(name, root, split, ("train", "dev", "test"))
    rows = _read_jsonl(name, root / "questions" / "US" / f"{split}.jsonl", root)
    samples = (Sample("qa", {"question": _words(row["question"])}, _answer(row["answer"]), source=name,
                      meta={"options": row.get("options"), "answer_idx": row.get("answer_idx")})
               for row in rows)
    return _take(name, samples, limit)


def _pubmedqa_records(root: Path, split: str, fold: int) -> dict[str, dict[str, Any]]:
    name = "pubmedqa"
    set_files = ([root / "test_set.json"] if split == "test"
                 else [root / f"pqal_fold{fold}" / f"{split}_set.json", root / f"{split}_set.json"])
    for set_file in set_files:
        if set_file.exists():
            return _read_json(name, set_file, root, dict)
    if split == "dev":
        raise _missing(name, set_files[0], root)
    records = _read_json(name, root / "ori_pqal.json", root, dict)
    test_pmids = set(_read_json(name, root / "test_ground_truth.json", root))
    return {pmid: rec for pmid, rec in records.items() if (pmid in test_pmids) == (split == "test")}


def load_pubmedqa(root: PathLike, split: str = "train", fold: int = 0, limit: int | None = None) -> list[Sample]:
    """PubMedQA PQA-L: the question alone (no abstract context, as Uni-Med), answer yes/no/maybe.

    Splits, in order of preference: the official split script's files (``pqal_fold<fold>/{train,dev}_set.json``
    or ``{train,dev}_set.json`` in the root, and ``test_set.json`` — Uni-Med trains on ``train_set.json``); else
    ``ori_pqal.json`` split by ``test_ground_truth.json``: ``test`` = its 500 pmids, ``train`` = the other 500
    (the whole cross-validation pool); ``dev`` needs the split script's files. ``meta["pmid"]`` is kept.
    """
    name = "pubmedqa"
    root = _root(name, root, split, ("train", "dev", "test"))
    records = _pubmedqa_records(root, split, fold)
    samples = (Sample("qa", {"question": _words(rec["QUESTION"])}, _answer(rec["final_decision"]), source=name,
                      meta={"pmid": str(pmid)})
               for pmid, rec in records.items())
    return _take(name, samples, limit)


# --- SLAKE ----------------------------------------------------------------------------------------------------

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


# --- Path-VQA -------------------------------------------------------------------------------------------------


_SAFE_GLOBALS = {("builtins", n) for n in ("dict", "list", "tuple", "set", "frozenset", "str", "bytes", "int",
                                            "float", "complex", "bool")}


class _PlainUnpickler(pickle.Unpickler):
    """Builds only plain containers, strings and numbers: any other class or function is refused, so a
    pickle cannot run code (``pickle.load`` would call whatever the file names)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused {module}.{name}: only plain containers, strings and numbers are "
                                     "loaded (a pickle naming other objects can run code)")


def _read_pickle(name: str, path: Path, root: Path) -> Any:
    """Annotations pickled as plain lists/dicts, read with `_PlainUnpickler` (never runs code from the file)."""
    data = _require(name, path, root).read_bytes()
    try:
        value = _PlainUnpickler(io.BytesIO(data)).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, AttributeError) as error:
        raise _malformed(name, path, f"not a plain pickled list of annotations ({type(error).__name__}: {error}); "
                                     "convert it to plain lists/dicts") from None
    if not isinstance(value, list):
        raise _malformed(name, path, f"unpickled a {type(value).__name__}, not a list of annotation records")
    return _records(value, name, path)


def _pathvqa_rows(root: Path, split: str) -> list[tuple[str, str, str, str | None, Any]]:
    """``(img_id, question, answer, answer_type, question_id)`` from whichever annotation format is present."""
    name = "pathvqa"
    vqa_file = root / "qas" / f"{split}_vqa.pkl"
    if vqa_file.exists():
        return [(row["img_id"], row["sent"], next(iter(row["label"])), row.get("answer_type"), row.get("question_id"))
                for row in _read_pickle(name, vqa_file, root) if row.get("label")]
    qa_file = root / "qas" / split / f"{split}_qa.pkl"
    if not qa_file.exists():
        raise _missing(name, vqa_file, root)
    return [(row["image"], row["question"], row["answer"], None, None) for row in _read_pickle(name, qa_file, root)]


def load_pathvqa(root: PathLike, split: str = "train", limit: int | None = None) -> list[Sample]:
    """Path-VQA: pathology VQA, closed = yes/no questions.

    Layout: ``<root>/qas/<split>_vqa.pkl`` (the LXMERT-style lists Uni-Med reads: ``{img_id, sent, label:
    {answer: score}, answer_type: "yes/no"|"other", question_id}``; the answer is the first label, as in the
    original) or, failing that, ``<root>/qas/<split>/<split>_qa.pkl`` (``{image, question, answer}``; closed =
    answer is yes/no). Images: ``<root>/images/<split>/<img_id>.jpg``. The annotations are Python pickles, read
    by a restricted unpickler that builds only plain containers and numbers (never runs code). ``meta``: ``answer_type``, ``question_id``.
    """
    name = "pathvqa"
    root = _root(name, root, split, ("train", "val", "test"))
    rows = _pathvqa_rows(root, split)

    def samples() -> Iterator[Sample]:
        for img_id, question, answer, answer_type, question_id in rows:
            image = _image(name, root / "images" / split / f"{img_id}.jpg", root)
            closed = answer_type == "yes/no" if answer_type else _words(answer).lower() in ("yes", "no")
            yield Sample("vqa", {"question": _words(question)}, _answer(answer), str(image), f"pathvqa/{img_id}",
                         name, {"answer_type": "closed" if closed else "open", "question_id": question_id})

    return _take(name, samples(), limit)


# --- report generation ----------------------------------------------------------------------------------------


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
                   annotation: str = "annotation.json", limit: int | None = None) -> list[Sample]:
    """MIMIC-CXR report generation in the layout Uni-Med reads (R2Gen's ``annotation.json``).

    ``<root>/<annotation>`` is ``{"train"|"val"|"test": [{"image_path": [relative jpg, ...], "report": text,
    ...}]}``; each study uses its first image, at ``<image_root>/files/<relative jpg>`` (``image_root``
    defaults to ``root``; Uni-Med points it at MIMIC-CXR-JPG 2.0.0). Studies whose image is absent are
    skipped, as in the original. ``annotation`` selects a subset file (Uni-Med trains on
    ``annotation_small.json``). Answer = the report collapsed to one line and cut to 50 words.
    """
    name = "mimic_cxr"
    root = _root(name, root, split, ("train", "val", "test"))
    images = Path(image_root).expanduser() if image_root is not None else root
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


# --- SA-Med2D-20M ---------------------------------------------------------------------------------------------


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
                       limit: int | None) -> list[Sample]:
    root = _root(name, root, split, ("train", "test", "all"))
    expect(0.0 <= test_fraction <= 1.0, f"{name}: test_fraction", "a fraction in [0, 1]", test_fraction)
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
                                            f"samed2d/{stem}")

    return _take(name, samples(), limit)


def load_samed2d_rec(root: PathLike, split: str = "train", annotation: str = "SAMed2D_v1.json",
                     test_fraction: float = 0.1, limit: int | None = None) -> list[Sample]:
    """SA-Med2D-20M referring expression comprehension: one sample per (image, mask).

    ``<root>`` is the unpacked ``SAMed2Dv1`` folder. ``<root>/<annotation>`` maps ``images/<stem>.png`` to its
    masks ``masks/<stem>--<class id, 4 digits>_<instance, 3 digits>.png`` with ``<stem>`` =
    ``<modality>--<dataset>--<case>--<axis>_<slice>``; the object name is the class id looked up for
    ``<dataset>`` in ``SAMed2D_v1_class_mapping_id.json``, underscores read as spaces (masks whose id has no
    name, or with no foreground, are skipped). The box is the bounding box of the mask's non-zero pixels, on
    the mask's size. SA-Med2D has no official split (Uni-Med used unpublished "small" subsets): ``train`` /
    ``test`` hash each case (all its slices together) to hold out ``test_fraction`` of cases; ``all`` keeps
    every image; ``annotation`` may name a subset file in the same format.
    """
    return _samed2d_grounding("samed2d_rec", "rec", root, split, annotation, test_fraction, limit)


def load_samed2d_reg(root: PathLike, split: str = "train", annotation: str = "SAMed2D_v1.json",
                     test_fraction: float = 0.1, limit: int | None = None) -> list[Sample]:
    """SA-Med2D-20M referring expression generation: box text in, class name out (see `load_samed2d_rec`)."""
    return _samed2d_grounding("samed2d_reg", "reg", root, split, annotation, test_fraction, limit)


# --- MedMNIST -------------------------------------------------------------------------------------------------


def _medmnist(flag: str, root: PathLike, split: str, size: int | None, limit: int | None) -> list[Sample]:
    root = _root(flag, root, split, ("train", "val", "test"))
    _check_limit(flag, limit)
    if size is None:
        candidates = [root / f"{flag}_224.npz", root / f"{flag}.npz"]
    else:
        candidates = [root / (f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz")]
    path = next((c for c in candidates if c.exists()), None)
    if path is None:
        raise _missing(flag, candidates[0], root)
    labels_official = OFFICIAL_LABELS[flag]
    try:
        archive = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as error:
        raise _malformed(flag, path, f"not a NumPy .npz archive ({type(error).__name__})") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise _malformed(flag, path, "a single .npy array, not an .npz archive of arrays")
    with archive:
        keys = (f"{split}_images", f"{split}_labels")
        absent = [key for key in keys if key not in archive.files]
        if absent:
            raise MalformedDataError(f"{flag}: {path} lacks {absent}; expected {LAYOUTS[flag]}")
        try:
            all_labels = archive[keys[1]]
            images = archive[keys[0]] if limit is None else archive[keys[0]][:limit].copy()
        except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as error:
            raise _malformed(flag, path, f"a damaged archive ({type(error).__name__}: {error})") from None
        if len(all_labels) < len(images):
            raise _malformed(flag, path, f"{keys[1]} has {len(all_labels)} labels for {len(images)} images")
        labels = all_labels.reshape(len(all_labels), -1)[:len(images), 0]
    bad = [(i, label) for i, label in enumerate(labels)
           if not float(label).is_integer() or not 0 <= int(label) < len(labels_official)]
    if bad:
        raise _malformed(flag, path, f"{keys[1]}[{bad[0][0]}] = {bad[0][1]!r} is not a class index in "
                                     f"0..{len(labels_official) - 1}")
    samples = (Sample("cls", {"question": QUESTIONS[flag]}, answer_name(labels_official[int(label)]), images[i],
                      f"{flag}/{split}/{i}", flag, {"label": int(label), "label_name": labels_official[int(label)]})
               for i, label in enumerate(labels))
    return _take(flag, samples, limit)


def load_dermamnist(root: PathLike, split: str = "train", size: int | None = None,
                    limit: int | None = None) -> list[Sample]:
    """DermaMNIST (7 skin-lesion classes) classification with Uni-Med's fixed question.

    ``<root>/dermamnist_224.npz`` (Uni-Med trains at 224 px) or ``dermamnist.npz`` (28 px) — the first
    present, or exactly ``dermamnist_<size>.npz`` / ``dermamnist.npz`` (28) when ``size`` is given — with
    ``{train,val,test}_images`` (uint8 ``[N, H, W, 3]``) and ``{train,val,test}_labels`` (``[N, 1]``).
    Image = the uint8 array; answer = the class name; ``meta``: ``label`` (index), ``label_name``.
    """
    return _medmnist("dermamnist", root, split, size, limit)


def load_organsmnist(root: PathLike, split: str = "train", size: int | None = None,
                     limit: int | None = None) -> list[Sample]:
    """OrganSMNIST (11 organs, sagittal CT) classification with Uni-Med's fixed question.

    Files as `load_dermamnist` (``organsmnist_224.npz`` / ``organsmnist.npz``), images uint8 ``[N, H, W]``.
    Answers use Uni-Med's wording of the official names (``"kidney-left"`` → ``"left kidney"``);
    ``meta["label_name"]`` keeps the official name.
    """
    return _medmnist("organsmnist", root, split, size, limit)


# --- registry -------------------------------------------------------------------------------------------------

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


def load_dataset(name: str, root: PathLike, split: str = "train", /, **options: Any) -> list[Sample]:
    """The samples of dataset `name` (a key of `LOADERS`) read from `root`, with that loader's `options`."""
    if name not in LOADERS:
        raise UnknownNameError("dataset", name, LOADERS)
    function = LOADERS[name].function
    accepted = [p for p in inspect.signature(function).parameters if p not in ("root", "split")]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise CMoEError(f"{name}: unknown option(s) {unknown}; {name} accepts {', '.join(accepted)} "
                        "(check the dataset entry's options in the config)")
    return function(root, split, **options)


__all__ = ["DataError", "LAYOUTS", "LOADERS", "Loader", "MalformedDataError", "MissingDataError", "MEDPIX_QUESTION", "MIMIC_QUESTION", "load_dataset", "load_dermamnist",
           "load_medpix", "load_medqa", "load_mimic_cxr", "load_organsmnist", "load_pathvqa", "load_pubmedqa",
           "load_samed2d_rec", "load_samed2d_reg", "load_slake_rec", "load_slake_reg", "load_slake_vqa"]
