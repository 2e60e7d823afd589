"""Uni-Med dataset loaders: each reads a tiny fixture written in the real public format into tmp_path."""

from __future__ import annotations

import csv
import re
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cmoe.errors import CMoEError, UnknownNameError
from cmoe.reference_models.unimed.boxes import Box
from cmoe.reference_models.unimed.data.loaders import LOADERS, load_dataset
from cmoe.reference_models.unimed.data.medmnist_classes import QUESTIONS, class_names
from cmoe.reference_models.unimed.data.sample import Sample
from cmoe.reference_models.unimed.tasks import get_task


def _write_json(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")


def _write_image(path: Path, width: int, height: int, mask: tuple[int, int, int, int] | None = None) -> None:
    """A black RGB image (or, with `mask` = x, y, w, h, a grayscale mask with that rectangle set to 255)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if mask is None:
        Image.new("RGB", (width, height)).save(path)
        return
    pixels = np.zeros((height, width), dtype=np.uint8)
    x, y, w, h = mask
    pixels[y:y + h, x:x + w] = 255
    Image.fromarray(pixels).save(path)


def _loaded(name: str, root: Path, split: str = "train", **options: object) -> list[Sample]:
    """Load through the registry and check what every loader promises: task, source, a fillable template."""
    samples = load_dataset(name, root, split, **options)
    for sample in samples:
        assert sample.task == LOADERS[name].task and sample.source == name
        get_task(sample.task).instruction(**sample.fields)
    return samples


def test_medqa_question_only_answer_text(tmp_path: Path) -> None:
    rows = [{"question": "A 23-year-old  woman\npresents with ...?", "answer": "Nitrofurantoin",
             "options": {"A": "Ampicillin", "E": "Nitrofurantoin"}, "answer_idx": "E"},
            {"question": "Second?", "answer": "Aspirin", "options": {"A": "Aspirin"}, "answer_idx": "A"}]
    path = tmp_path / "questions" / "US" / "dev.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n", encoding="utf-8")

    samples = _loaded("medqa", tmp_path, "dev")
    assert [s.answer for s in samples] == ["Nitrofurantoin", "Aspirin"]
    first = samples[0]
    assert first.fields == {"question": "A 23-year-old woman presents with ...?"}
    assert first.image is None and first.meta["answer_idx"] == "E" and "E" in first.meta["options"]
    assert len(_loaded("medqa", tmp_path, "dev", limit=1)) == 1


def _pubmed_record(question: str, decision: str) -> dict[str, object]:
    return {"QUESTION": question, "CONTEXTS": ["ignored context"], "final_decision": decision, "LONG_ANSWER": "x"}


def test_pubmedqa_splits_by_test_ground_truth(tmp_path: Path) -> None:
    _write_json(tmp_path / "ori_pqal.json", {"1": _pubmed_record("Q1?", "yes"), "2": _pubmed_record("Q2?", "no"),
                                             "3": _pubmed_record("Q3?", "maybe"), "4": _pubmed_record("Q4?", "yes")})
    _write_json(tmp_path / "test_ground_truth.json", {"2": "no", "3": "maybe"})

    test = _loaded("pubmedqa", tmp_path, "test")
    assert [(s.meta["pmid"], s.fields["question"], s.answer) for s in test] == [("2", "Q2?", "no"),
                                                                                ("3", "Q3?", "maybe")]
    assert [s.meta["pmid"] for s in _loaded("pubmedqa", tmp_path, "train")] == ["1", "4"]
    with pytest.raises(CMoEError, match="dev_set.json"):
        load_dataset("pubmedqa", tmp_path, "dev")


def test_pubmedqa_prefers_the_split_script_files(tmp_path: Path) -> None:
    _write_json(tmp_path / "pqal_fold0" / "train_set.json", {"7": _pubmed_record("Q7?", "maybe")})
    samples = _loaded("pubmedqa", tmp_path, "train")
    assert [(s.meta["pmid"], s.answer) for s in samples] == [("7", "maybe")]


@pytest.fixture
def slake_root(tmp_path: Path) -> Path:
    """SLAKE 1.0: one 200×100 image with two organ boxes, one image without detection.json."""
    rows = [
        {"img_id": 1, "img_name": "xmlab1/source.jpg", "question": "Is the liver healthy?", "answer": "Yes",
         "q_lang": "en", "answer_type": "CLOSED", "qid": 11},
        {"img_id": 1, "img_name": "xmlab1/source.jpg", "question": "肝脏健康吗?", "answer": "是",
         "q_lang": "zh", "answer_type": "CLOSED", "qid": 12},
        {"img_id": 1, "img_name": "xmlab1/source.jpg", "question": "Empty?", "answer": " ",
         "q_lang": "en", "answer_type": "OPEN", "qid": 13},
        {"img_id": 2, "img_name": "xmlab2/source.jpg", "question": "Which organ is  abnormal?", "answer": "Lung",
         "q_lang": "en", "answer_type": "OPEN", "qid": 14},
    ]
    _write_json(tmp_path / "train.json", rows)
    _write_image(tmp_path / "imgs" / "xmlab1" / "source.jpg", 200, 100)
    _write_image(tmp_path / "imgs" / "xmlab2" / "source.jpg", 64, 64)
    _write_json(tmp_path / "imgs" / "xmlab1" / "detection.json",
                [{"Liver": [20, 10, 50, 40]}, {"Heart": [0, 0, 200, 100]}])
    return tmp_path


def test_slake_vqa_english_non_empty_with_answer_type(slake_root: Path) -> None:
    samples = _loaded("slake_vqa", slake_root)
    assert [(s.fields["question"], s.answer, s.meta["answer_type"]) for s in samples] == [
        ("Is the liver healthy?", "Yes", "closed"), ("Which organ is abnormal?", "Lung", "open")]
    assert samples[0].image == str(slake_root / "imgs" / "xmlab1" / "source.jpg")
    assert [s.image_id for s in samples] == ["slake/xmlab1", "slake/xmlab2"]


def test_slake_rec_and_reg_encode_detection_boxes(slake_root: Path) -> None:
    rec = _loaded("slake_rec", slake_root)
    assert [(s.fields["object"], s.answer) for s in rec] == [("Liver", "{<10><10><35><50>}"),
                                                             ("Heart", "{<0><0><100><100>}")]
    assert rec[0].meta["box"] == Box(10, 10, 35, 50) and rec[0].meta["image_size"] == (200, 100)
    assert rec[0].image_id == "slake/xmlab1" and rec[0].image == str(slake_root / "imgs" / "xmlab1" / "source.jpg")

    reg = _loaded("slake_reg", slake_root)
    assert [(s.fields["box"], s.answer) for s in reg] == [("{<10><10><35><50>}", "Liver"),
                                                          ("{<0><0><100><100>}", "Heart")]
    assert reg[1].meta["box"] == Box(0, 0, 100, 100)


def test_slake_missing_image_names_the_path(slake_root: Path) -> None:
    (slake_root / "imgs" / "xmlab2" / "source.jpg").unlink()
    with pytest.raises(CMoEError, match=r"slake_vqa: missing .*xmlab2.*source\.jpg"):
        load_dataset("slake_vqa", slake_root)


def test_pathvqa_lxmert_pickles_and_closed_questions(tmp_path: Path) -> None:
    rows = [{"img_id": "train_0001", "sent": "Is this  a neoplasm?", "label": {"yes": 1}, "answer_type": "yes/no",
             "question_id": 100001000, "question_type": "is"},
            {"img_id": "train_0001", "sent": "Where are liver stem cells located?",
             "label": {"in the canals of hering": 1}, "answer_type": "other", "question_id": 100001001}]
    (tmp_path / "qas").mkdir()
    (tmp_path / "qas" / "train_vqa.pkl").write_bytes(pickle.dumps(rows))
    _write_image(tmp_path / "images" / "train" / "train_0001.jpg", 32, 32)

    samples = _loaded("pathvqa", tmp_path)
    assert [(s.fields["question"], s.answer, s.meta["answer_type"]) for s in samples] == [
        ("Is this a neoplasm?", "yes", "closed"), ("Where are liver stem cells located?", "in the canals of hering",
                                                   "open")]
    assert samples[0].image == str(tmp_path / "images" / "train" / "train_0001.jpg")
    assert samples[0].image_id == "pathvqa/train_0001" and samples[1].meta["question_id"] == 100001001


def test_pathvqa_plain_qa_pickles(tmp_path: Path) -> None:
    rows = [{"image": "val_0261", "question": "What have lost their nuclei?", "answer": "neutrophils"},
            {"image": "val_0261", "question": "Are neutrophils shown?", "answer": "No"}]
    (tmp_path / "qas" / "val").mkdir(parents=True)
    (tmp_path / "qas" / "val" / "val_qa.pkl").write_bytes(pickle.dumps(rows))
    _write_image(tmp_path / "images" / "val" / "val_0261.jpg", 32, 32)

    samples = _loaded("pathvqa", tmp_path, "val")
    assert [(s.answer, s.meta["answer_type"]) for s in samples] == [("neutrophils", "open"), ("No", "closed")]


def test_mimic_cxr_reports_one_line_and_missing_images_skipped(tmp_path: Path) -> None:
    present = "p10/p10000032/s50414267/a.jpg"
    annotation = {"train": [
        {"id": "a", "report": "The lungs are clear.\n\nNo  effusion.", "image_path": [present, "p10/other.jpg"]},
        {"id": "b", "report": "Cardiomegaly.", "image_path": ["p11/missing.jpg"]},
    ], "val": [], "test": [{"id": "c", "report": "x", "image_path": ["p12/missing.jpg"]}]}
    _write_json(tmp_path / "annotation.json", annotation)
    _write_image(tmp_path / "files" / present, 16, 16)

    samples = _loaded("mimic_cxr", tmp_path)
    assert len(samples) == 1
    report = samples[0]
    assert report.fields == {"question": "Describe the given chest x-ray image in detail."}
    assert report.answer == "The lungs are clear. No effusion."
    assert report.image == str(tmp_path / "files" / present) and report.image_id == f"mimic_cxr/{present}"
    with pytest.raises(CMoEError, match=r"mimic_cxr: missing .*p12/missing\.jpg"):
        load_dataset("mimic_cxr", tmp_path, "test")


def test_medpix_caption_rows_only(tmp_path: Path) -> None:
    with (tmp_path / "MedPix_single_test.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["", "name", "context", "type"])
        writer.writerow([0, "MPX1_synpic1.png", "Axial CT shows a\nmass.", "caption"])
        writer.writerow([1, "MPX1_synpic1.png", "CT - noncontrast", "modality"])
        writer.writerow([2, "MPX2_synpic2.png", "Not on disk.", "caption"])
    _write_image(tmp_path / "images" / "MPX1_synpic1.png", 16, 16)

    samples = _loaded("medpix", tmp_path, "test")
    assert [(s.fields["question"], s.answer, s.image_id) for s in samples] == [
        ("Describe this input image.", "Axial CT shows a mass.", "medpix/MPX1_synpic1.png")]
    assert samples[0].image == str(tmp_path / "images" / "MPX1_synpic1.png")


@pytest.fixture
def samed2d_root(tmp_path: Path) -> Path:
    """SAMed2Dv1: one 40×20 slice with a left-kidney mask, an empty mask and a mask of an unnamed class."""
    stem = "ct_00--Demo--Case_001--x_0007"
    masks = [f"masks/{stem}--0001_000.png", f"masks/{stem}--0000_000.png", f"masks/{stem}--0009_000.png"]
    _write_json(tmp_path / "SAMed2D_v1.json", {f"images/{stem}.png": masks})
    _write_json(tmp_path / "SAMed2D_v1_class_mapping_id.json",
                {"Demo": {"liver": 0, "union_kidney": 1, "left_kidney": 1}})
    _write_image(tmp_path / "images" / f"{stem}.png", 40, 20)
    _write_image(tmp_path / masks[0], 40, 20, mask=(4, 2, 10, 10))
    _write_image(tmp_path / masks[1], 40, 20, mask=(0, 0, 0, 0))
    _write_image(tmp_path / masks[2], 40, 20, mask=(0, 0, 5, 5))
    return tmp_path


def test_samed2d_rec_reg_boxes_from_masks(samed2d_root: Path) -> None:
    rec = _loaded("samed2d_rec", samed2d_root, "all")
    assert [(s.fields["object"], s.answer) for s in rec] == [("left kidney", "{<10><10><35><60>}")]
    assert rec[0].meta["box"] == Box(10, 10, 35, 60) and rec[0].meta["image_size"] == (40, 20)
    assert rec[0].image_id == "samed2d/ct_00--Demo--Case_001--x_0007"
    assert rec[0].image == str(samed2d_root / "images" / "ct_00--Demo--Case_001--x_0007.png")

    reg = _loaded("samed2d_reg", samed2d_root, "all")
    assert [(s.fields["box"], s.answer) for s in reg] == [("{<10><10><35><60>}", "left kidney")]


def test_samed2d_case_split_is_a_partition(samed2d_root: Path) -> None:
    assert _loaded("samed2d_rec", samed2d_root, "test", test_fraction=0.0) == []
    assert len(_loaded("samed2d_rec", samed2d_root, "train", test_fraction=0.0)) == 1
    assert len(_loaded("samed2d_rec", samed2d_root, "test", test_fraction=1.0)) == 1
    assert _loaded("samed2d_rec", samed2d_root, "train", test_fraction=1.0) == []


def _write_npz(path: Path, images: np.ndarray, labels: list[int]) -> None:
    np.savez(path, train_images=images, train_labels=np.array(labels, dtype=np.uint8).reshape(-1, 1),
             val_images=images[:1], val_labels=np.array(labels[:1], dtype=np.uint8).reshape(-1, 1),
             test_images=images[:1], test_labels=np.array(labels[:1], dtype=np.uint8).reshape(-1, 1))


def test_dermamnist_class_names_and_224_preference(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    _write_npz(tmp_path / "dermamnist_224.npz", rng.integers(0, 255, (3, 8, 8, 3), dtype=np.uint8), [0, 4, 6])
    _write_npz(tmp_path / "dermamnist.npz", np.zeros((1, 4, 4, 3), dtype=np.uint8), [5])

    samples = _loaded("dermamnist", tmp_path)
    assert [s.answer for s in samples] == ["actinic keratoses and intraepithelial carcinoma", "melanoma",
                                           "vascular lesions"]
    assert [s.meta["label"] for s in samples] == [0, 4, 6] and samples[1].image_id == "dermamnist/train/1"
    assert samples[0].fields == {"question": QUESTIONS["dermamnist"]}
    assert samples[2].image.shape == (8, 8, 3) and samples[2].image.dtype == np.uint8
    assert [s.answer for s in _loaded("dermamnist", tmp_path, size=28)] == ["melanocytic nevi"]
    assert len(_loaded("dermamnist", tmp_path, limit=2)) == 2


def test_organsmnist_uses_uni_meds_wording(tmp_path: Path) -> None:
    _write_npz(tmp_path / "organsmnist.npz", np.zeros((2, 4, 4), dtype=np.uint8), [1, 9])
    samples = _loaded("organsmnist", tmp_path)
    assert [(s.answer, s.meta["label_name"]) for s in samples] == [("left femur", "femur-left"),
                                                                   ("pancreas", "pancreas")]
    assert samples[0].image.shape == (4, 4)
    for flag in ("dermamnist", "organsmnist"):
        assert all(name in QUESTIONS[flag] for name in class_names(flag))


def test_missing_annotation_error_names_path_dataset_and_layout(tmp_path: Path) -> None:
    with pytest.raises(CMoEError) as error:
        load_dataset("slake_vqa", tmp_path, "test")
    message = str(error.value)
    assert message.startswith(f"slake_vqa: missing {tmp_path / 'test.json'}")
    assert "SLAKE 1.0" in message and "detection.json" in message


@pytest.mark.parametrize("name", sorted(LOADERS))
def test_every_loader_reports_a_missing_file(name: str, tmp_path: Path) -> None:
    with pytest.raises(CMoEError, match=rf"^{name}: missing {re.escape(str(tmp_path))}"):
        load_dataset(name, tmp_path, "test")


def test_unknown_dataset_lists_known_ones(tmp_path: Path) -> None:
    with pytest.raises(UnknownNameError, match="known datasets: dermamnist, medpix, medqa"):
        load_dataset("vqa_rad", tmp_path)


@pytest.mark.parametrize("name", sorted(LOADERS))
def test_bad_split_is_rejected_with_the_valid_ones(name: str, tmp_path: Path) -> None:
    with pytest.raises(CMoEError, match=rf"{name}: unknown split 'training'; valid splits: train, "):
        load_dataset(name, tmp_path, "training")


def test_negative_limit_is_rejected(slake_root: Path) -> None:
    with pytest.raises(CMoEError, match="limit"):
        load_dataset("slake_vqa", slake_root, limit=-1)


def test_registry_describes_each_layout() -> None:
    assert {entry.task for entry in LOADERS.values()} == {"qa", "vqa", "report", "rec", "reg", "cls"}
    assert all(entry.layout and "<root>" in entry.layout for entry in LOADERS.values())


def test_an_unset_variable_in_a_data_path_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A config's ``${UNIMED_DATA}`` stays literal when the variable is unset: the error says so and how to fix."""
    monkeypatch.delenv("UNIMED_DATA", raising=False)
    with pytest.raises(CMoEError, match=r"medqa: data root \$\{UNIMED_DATA\}/MedQA is not a directory \(the "
                                        r"environment variable UNIMED_DATA is not set: export UNIMED_DATA="):
        load_dataset("medqa", "${UNIMED_DATA}/MedQA", "test")
    monkeypatch.setenv("UNIMED_DATA", str(tmp_path))  # set but wrong: no hint about the variable
    with pytest.raises(CMoEError) as error:
        load_dataset("medqa", tmp_path / "nowhere", "test")
    assert "environment variable" not in str(error.value)


def test_release_layouts_are_detected_and_named(slake_root: Path, samed2d_root: Path) -> None:
    """SLAKE 1.0 and SAMed2Dv1 folders are read as the ``release`` layout (the original reads ``uni-med``; see
    tests/unimed/data/test_unimed_original_layouts.py), and their samples say so."""
    from cmoe.reference_models.unimed.data.loaders import detect_layout

    assert detect_layout("slake_vqa", slake_root).name == "release"
    assert {s.meta["layout"] for s in _loaded("slake_rec", slake_root)} == {"release"}
    assert detect_layout("samed2d_reg", samed2d_root, "all").name == "release"
    assert {s.meta["layout"] for s in _loaded("samed2d_reg", samed2d_root, "all")} == {"release"}
