"""Helpers every loader shares: the errors (`DataError` and its kinds), split, limit and layout checks, JSON and
image readers, grounding samples."""

from __future__ import annotations

import functools
import itertools
import json
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Union

from cmoe.errors import CMoEError, expect, unset_variables_hint
from cmoe.reference_models.unimed.boxes import SCALE, parse_box
from cmoe.reference_models.unimed.data.loaders.layouts import AUTO, LAYOUT_CHOICES, LAYOUTS
from cmoe.reference_models.unimed.data.sample import Sample
from cmoe.reference_models.unimed.prompts import clean_answer
from cmoe.reference_models.unimed.text_processing import current_text_processor, original_text

PathLike = Union[str, Path]

logger = logging.getLogger("cmoe.unimed.data")


class DataError(CMoEError):
    """A dataset that cannot be read as its loader's layout describes; the message names the file."""


class MissingDataError(DataError):
    """A file or folder the layout needs is absent; ``path`` is the one that would fix it."""

    path: Path | None = None


class MalformedDataError(DataError):
    """A file is present but its contents are not what the layout describes."""


def _missing(name: str, path: Path, root: Path) -> MissingDataError:
    error = MissingDataError(f"{name}: missing {path}{unset_variables_hint(path)}; expected {LAYOUTS[name]} "
                             f"(root = {root})")
    error.path = path
    return error


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
        error = MissingDataError(f"{name}: data root {path} is not a directory{unset_variables_hint(path)}; "
                                 f"expected {LAYOUTS[name]}")
        error.path = path
        raise error
    return path


def _check_split(name: str, split: str, valid: Iterable[str]) -> None:
    valid = tuple(valid)
    if split not in valid:
        raise CMoEError(f"{name}: unknown split {split!r}; valid splits: {', '.join(valid)} (use one of them)")


def _check_layout(name: str, layout: str) -> None:
    """`layout` is ``auto`` or one of the layouts `name` reads."""
    valid = (AUTO, *(choice.name for choice in LAYOUT_CHOICES[name]))
    if layout not in valid:
        raise CMoEError(f"{name}: unknown layout {layout!r}; use one of {', '.join(valid)} (auto detects it from the "
                        "files present)")


def _log_layout(name: str, layout: str, root: Path, split: str) -> None:
    """One log line naming the layout a loader found."""
    logger.info("%s: reading the %s layout of %s (%s split)", name, layout, root, split)


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
    """Questions and object names: whitespace collapsed (``cmoe``), or the original's text processor with its
    50-word cut when loading under ``original`` (it processes every question; `using_text_processor`)."""
    if current_text_processor() == "original":
        return original_text(str(value))
    return " ".join(str(value).split())


def _answer(value: object) -> str:
    """The answer clean-up of the current text processor (`using_text_processor`): whitespace collapsed and cut
    to 50 words, ``</s>`` dropped under ``cmoe``; the original's ``blip_caption_new`` under ``original``."""
    if current_text_processor() == "original":
        return original_text(str(value))
    return clean_answer(str(value))


def _cut(value: object, max_words: int | None) -> str:
    """Whitespace collapsed and, unless `max_words` is None, cut to `max_words` words (the original's text
    processor, ``blip_caption_new``, cuts whatever it is given to 50 words)."""
    if current_text_processor() == "original":
        return original_text(str(value), max_words)
    return _words(value) if max_words is None else clean_answer(str(value), max_words)


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


def _box_text(xywh: Iterable[float], width: int, height: int) -> str:
    """Pixel ``[x, y, w, h]`` → ``{<x1><y1><x2><y2>}`` with the original's arithmetic: ``int(v / size * 100)``,
    dividing first (``v * 100 / size`` rounds differently for a few values, e.g. 29 px of 100 gives 28 here, as in
    the original), clamped to 0–100 under the ``cmoe`` text processor; under ``original`` not clamped, as the
    original writes a box that runs past the image (equal for every box inside it)."""
    values = tuple(float(v) for v in xywh)
    if len(values) != 4 or width <= 0 or height <= 0 or values[2] < 0 or values[3] < 0:
        raise CMoEError(f"box: expected [x, y, w, h] in pixels with w, h >= 0 on a positive image size, got {values} "
                        f"on {width}x{height}; fix the annotation")
    x, y, w, h = values
    corners = (int(c * SCALE) for c in (x / width, y / height, (x + w) / width, (y + h) / height))
    if current_text_processor() != "original":
        corners = (min(SCALE, max(0, c)) for c in corners)
    return "{" + "".join(f"<{c}>" for c in corners) + "}"


def _box_meta(xywh: Iterable[float], width: int, height: int) -> tuple[str, dict[str, Any]]:
    """The box text and the meta REC/REG evaluation needs (`Box`, the pixel box ``xywh`` as annotated: the
    original protocol's REC IoU is against it, image size)."""
    values = tuple(float(v) for v in xywh)
    text = _box_text(values, width, height)
    return text, {"box": parse_box(text), "xywh": values, "image_size": (width, height)}


def _grounding_sample(name: str, task: str, obj: str, xywh: Iterable[float], size: tuple[int, int],
                      image: Path, image_id: str, max_words: int | None = None,
                      meta: dict[str, Any] | None = None) -> Sample:
    """A REC sample (object → box) or a REG sample (box → object) for one object of one image; `max_words` cuts
    the object name in the instruction as the original's text processor does (None: whitespace collapsed only);
    `meta` adds to the sample's meta."""
    box_text, box_meta = _box_meta(xywh, *size)
    obj = _cut(obj, max_words)
    box_meta["object"] = obj
    box_meta.update(meta or {})
    if task == "rec":
        return Sample("rec", {"object": obj}, box_text, str(image), image_id, name, box_meta)
    return Sample("reg", {"box": box_text}, _answer(obj), str(image), image_id, name, box_meta)
