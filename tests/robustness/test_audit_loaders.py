"""Audit: damaged dataset folders. Every loader problem must raise a `DataError` (a `CMoEError`) naming the file
and what the layout expects; a pickled annotation file may never run code."""

from __future__ import annotations

import csv
import json
import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from robustness_audit import assert_clear

from cmoe import CMoEError
from cmoe.reference_models.unimed.data.loaders import DataError, load_dataset


def _json(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")


def _image(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 12)).save(path)


# --- valid minimal folders -----------------------------------------------------------------------------------

def medqa(root: Path) -> Path:
    path = root / "questions" / "US" / "train.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"question": "Q?", "answer": "A", "options": {}, "answer_idx": "A"}) + "\n")
    return path


def pubmedqa(root: Path) -> Path:
    _json(root / "test_ground_truth.json", {"2": "no"})
    _json(root / "ori_pqal.json", {"1": {"QUESTION": "Q?", "final_decision": "yes"},
                                   "2": {"QUESTION": "R?", "final_decision": "no"}})
    return root / "ori_pqal.json"


def slake(root: Path) -> Path:
    _json(root / "train.json", [{"img_name": "xmlab1/source.jpg", "question": "Q?", "answer": "yes", "q_lang": "en",
                                 "answer_type": "CLOSED", "qid": 1}])
    _image(root / "imgs" / "xmlab1" / "source.jpg")
    _json(root / "imgs" / "xmlab1" / "detection.json", [{"Liver": [1, 1, 4, 4]}])
    return root / "train.json"


def pathvqa(root: Path) -> Path:
    path = root / "qas" / "train_vqa.pkl"
    path.parent.mkdir(parents=True)
    path.write_bytes(pickle.dumps([{"img_id": "train_0001", "sent": "Q?", "label": {"yes": 1.0},
                                    "answer_type": "yes/no", "question_id": 1}]))
    _image(root / "images" / "train" / "train_0001.jpg")
    return path


def mimic(root: Path) -> Path:
    _json(root / "annotation.json", {"train": [{"image_path": ["p1/s1/a.jpg"], "report": "No acute findings."}]})
    _image(root / "files" / "p1" / "s1" / "a.jpg")
    return root / "annotation.json"


def medpix(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    with (root / "MedPix_single_train.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["name", "context", "type"])
        writer.writerow(["a.png", "A caption.", "caption"])
    _image(root / "images" / "a.png")
    return root / "MedPix_single_train.csv"


def derma(root: Path, labels: np.ndarray | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    images = np.zeros((2, 28, 28, 3), dtype=np.uint8)
    labels = np.array([[0], [6]]) if labels is None else labels
    np.savez(root / "dermamnist.npz", train_images=images, train_labels=labels)
    return root / "dermamnist.npz"


def samed(root: Path) -> Path:
    stem = "ct_00--AbdomenCT1K--Case_00011--x_0041"
    _image(root / "images" / f"{stem}.png")
    mask = np.zeros((12, 16), dtype=np.uint8)
    mask[2:5, 3:7] = 255
    (root / "masks").mkdir(parents=True)
    Image.fromarray(mask).save(root / "masks" / f"{stem}--0001_000.png")
    _json(root / "SAMed2D_v1.json", {f"images/{stem}.png": [f"masks/{stem}--0001_000.png"]})
    _json(root / "SAMed2D_v1_class_mapping_id.json", {"AbdomenCT1K": {"liver": 1}})
    return root / "SAMed2D_v1.json"


VALID: dict[str, tuple[Callable[[Path], Path], str]] = {
    "medqa": (medqa, "train"), "pubmedqa": (pubmedqa, "train"), "slake_vqa": (slake, "train"),
    "slake_rec": (slake, "train"), "pathvqa": (pathvqa, "train"), "mimic_cxr": (mimic, "train"),
    "medpix": (medpix, "train"), "dermamnist": (derma, "train"), "samed2d_rec": (samed, "all"),
}


@pytest.mark.parametrize("name", list(VALID))
def test_the_valid_fixture_loads(tmp_path, name: str) -> None:
    build, split = VALID[name]
    build(tmp_path)
    assert len(load_dataset(name, tmp_path, split)) >= 1


# --- annotation files damaged ----------------------------------------------------------------------------------

def _rewrite(text: str) -> Callable[[Path], None]:
    return lambda path: path.write_text(text, encoding="utf-8")


DAMAGED_ANNOTATIONS = {
    "not JSON": _rewrite("{\"a\": "),
    "not UTF-8": lambda path: path.write_bytes(b"\xff\xfe\xfa garbage"),
    "empty": _rewrite(""),
    "wrong top level": _rewrite("42"),
    "a record without its keys": None,
    "deleted": lambda path: path.unlink(),
}
_EMPTY_RECORD = {"medqa": "{}\n", "pubmedqa": '{"1": {}}', "slake_vqa": '[{"q_lang": "en", "answer": "x"}]',
                 "slake_rec": "[{}]", "pathvqa": None, "mimic_cxr": '{"train": [{"image_path": ["p1/s1/a.jpg"]}]}',
                 "samed2d_rec": '{"images/x.png": 5}'}


@pytest.mark.parametrize("kind", list(DAMAGED_ANNOTATIONS))
@pytest.mark.parametrize("name", ["medqa", "pubmedqa", "slake_vqa", "slake_rec", "mimic_cxr", "samed2d_rec"])
def test_a_damaged_annotation_file_is_named(tmp_path, name: str, kind: str) -> None:
    build, split = VALID[name]
    path = build(tmp_path)
    damage = DAMAGED_ANNOTATIONS[kind] or _rewrite(_EMPTY_RECORD[name])
    damage(path)
    with pytest.raises(DataError) as error:
        load_dataset(name, tmp_path, split)
    assert_clear(error.value, path.name)


def test_a_bad_line_of_a_jsonl_file_names_its_line_number(tmp_path) -> None:
    path = medqa(tmp_path)
    path.write_text(path.read_text() + "[1, 2]\n")
    with pytest.raises(DataError) as error:
        load_dataset("medqa", tmp_path)
    assert_clear(error.value, "train.jsonl", "line 2")


def test_a_missing_key_names_the_key_and_the_record(tmp_path) -> None:
    path = medqa(tmp_path)
    path.write_text(path.read_text() + json.dumps({"question": "no answer here"}) + "\n")
    with pytest.raises(DataError) as error:
        load_dataset("medqa", tmp_path)
    assert_clear(error.value, "train.jsonl", "'answer'", "line 2")


# --- images that are not images --------------------------------------------------------------------------------

_IMAGE = {"slake_vqa": "imgs/xmlab1/source.jpg", "slake_rec": "imgs/xmlab1/source.jpg",
          "pathvqa": "images/train/train_0001.jpg", "mimic_cxr": "files/p1/s1/a.jpg", "medpix": "images/a.png",
          "samed2d_rec": "images/ct_00--AbdomenCT1K--Case_00011--x_0041.png"}
NOT_IMAGES = {"text": b"this is not an image", "empty": b"", "truncated header": b"\xff\xd8\xff", "html": b"<html>"}


@pytest.mark.parametrize("content", list(NOT_IMAGES))
@pytest.mark.parametrize("name", list(_IMAGE))
def test_a_file_that_is_not_an_image_is_caught_at_load_time(tmp_path, name: str, content: str) -> None:
    build, split = VALID[name]
    build(tmp_path)
    image = tmp_path / _IMAGE[name]
    image.write_bytes(NOT_IMAGES[content])
    with pytest.raises(DataError) as error:
        load_dataset(name, tmp_path, split)
    assert_clear(error.value, image.name)


# --- pickles -----------------------------------------------------------------------------------------------------

class _Exploit:
    def __reduce__(self):
        import os

        return (os.system, ("touch PWNED",))


PICKLES = {
    "runs a command": lambda marker: pickle.dumps([_ExploitAt(marker)]),
    "names a class": lambda marker: pickle.dumps([__import__("collections").OrderedDict(a=1)]),
    "numpy array": lambda marker: pickle.dumps([{"img_id": np.array([1])}]),
    "garbage": lambda marker: b"\x80\x04garbage that is not a pickle",
    "truncated": lambda marker: pickle.dumps([{"img_id": "x", "sent": "q"}])[:-5],
    "empty": lambda marker: b"",
    "a dict, not a list": lambda marker: pickle.dumps({"img_id": "x"}),
    "a record without its keys": lambda marker: pickle.dumps([{"label": {"yes": 1}}]),
}


class _ExploitAt:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("kind", list(PICKLES))
def test_pathvqa_pickles_are_read_without_running_code(tmp_path, kind: str) -> None:
    path = pathvqa(tmp_path / "data")
    marker = tmp_path / "PWNED"
    path.write_bytes(PICKLES[kind](marker))
    with pytest.raises(DataError) as error:
        load_dataset("pathvqa", tmp_path / "data")
    assert_clear(error.value, "train_vqa.pkl")
    assert not marker.exists(), "unpickling ran code from the file"


def test_pathvqa_plain_pickles_with_sets_and_tuples_still_load(tmp_path) -> None:
    path = pathvqa(tmp_path)
    path.write_bytes(pickle.dumps([{"img_id": "train_0001", "sent": "Q?", "label": {"no": 1.0},
                                    "answer_type": "yes/no", "question_id": (1, 2), "tags": {"a", "b"}}]))
    samples = load_dataset("pathvqa", tmp_path)
    assert samples[0].answer == "no" and samples[0].meta["answer_type"] == "closed"


# --- MedMNIST archives ---------------------------------------------------------------------------------------------

NPZ = {
    "garbage": lambda path: path.write_bytes(b"not a zip archive at all"),
    "empty": lambda path: path.write_bytes(b""),
    "truncated": lambda path: path.write_bytes(path.read_bytes()[:200]),
    "a .npy array": lambda path: np.save(open(path, "wb"), np.zeros(3)),
    "a pickled object array": lambda path: np.savez(path, train_images=np.array([object()], dtype=object),
                                                    train_labels=np.array([[0]])),
    "missing keys": lambda path: np.savez(path, images=np.zeros((1, 28, 28, 3), np.uint8)),
    "label out of range": lambda path: derma(path.parent, np.array([[0], [99]])),
    "negative label": lambda path: derma(path.parent, np.array([[-1], [0]])),
    "fractional label": lambda path: derma(path.parent, np.array([[0.5], [1.0]])),
    "fewer labels than images": lambda path: derma(path.parent, np.array([[0]])),
}


@pytest.mark.parametrize("kind", list(NPZ))
def test_a_bad_medmnist_archive_is_named(tmp_path, kind: str) -> None:
    path = derma(tmp_path)
    NPZ[kind](path)
    with pytest.raises(DataError) as error:
        load_dataset("dermamnist", tmp_path)
    assert_clear(error.value, "dermamnist.npz")


# --- options, splits, roots ----------------------------------------------------------------------------------------

OPTIONS = [("medqa", {"limt": 3}, "limt"), ("pubmedqa", {"folds": 1}, "folds"), ("mimic_cxr", {"root": 1}, "root"),
           ("dermamnist", {"sizes": 28}, "sizes"), ("medqa", {"limit": -1}, "limit"),
           ("medqa", {"limit": "3"}, "limit"), ("medqa", {"split": "dev"}, "split")]


@pytest.mark.parametrize("name,options,named", OPTIONS, ids=[f"{n}-{o}" for n, o, _ in OPTIONS])
def test_unknown_or_bad_loader_options_are_named(tmp_path, name: str, options: dict, named: str) -> None:
    VALID[name][0](tmp_path)
    with pytest.raises(CMoEError) as error:
        load_dataset(name, tmp_path, "train", **options)
    assert_clear(error.value, named)


@pytest.mark.parametrize("name", list(VALID))
def test_a_bad_split_lists_the_valid_ones(tmp_path, name: str) -> None:
    VALID[name][0](tmp_path)
    with pytest.raises(CMoEError) as error:
        load_dataset(name, tmp_path, "training")
    assert_clear(error.value, "training", "split")


@pytest.mark.parametrize("name", list(VALID))
def test_a_root_that_is_not_a_folder_is_named(tmp_path, name: str) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(CMoEError) as error:
        load_dataset(name, tmp_path / "file", VALID[name][1])
    assert_clear(error.value, "file")


def test_an_unknown_dataset_lists_the_known_ones(tmp_path) -> None:
    with pytest.raises(CMoEError) as error:
        load_dataset("imagenet", tmp_path)
    assert_clear(error.value, "imagenet")
