"""Path-VQA: pathology VQA from the release's pickled QA lists, read by a restricted unpickler."""

from __future__ import annotations

import io
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cmoe.reference_models.unimed.data.loaders.common import (
    PathLike,
    _answer,
    _image,
    _malformed,
    _missing,
    _records,
    _require,
    _root,
    _take,
    _words,
)
from cmoe.reference_models.unimed.data.sample import Sample

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
