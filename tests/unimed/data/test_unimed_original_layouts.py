"""The original Uni-Med's processed layouts (SLAKE's ``train.txt``/``imgs/<f>/…``, SA-Med2D's ``regions_small_*``),
its mix (one MedMNIST source drawn by size) and its 50-word instruction cut.

Each tiny folder is written here in the layout the original reads; the expected records are what the original's
readers yield for the same files, worked out from its code (tsinghua-msiip/Uni-Med, named per test) and checked
once by running those classes on these folders (their ``regions`` / ``annotation`` lists and ``preprocess``
output, with its ``blip_caption_new`` text processor).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_unimed_loaders import _loaded

from cmoe.errors import CMoEError
from cmoe.reference_models.unimed.boxes import Box
from cmoe.reference_models.unimed.config import DataSection, DatasetEntry
from cmoe.reference_models.unimed.data.loaders import LAYOUTS, detect_layout, load_dataset
from cmoe.reference_models.unimed.data.mixing import TaskRatioSampler
from cmoe.reference_models.unimed.data.splits import load_split
from cmoe.reference_models.unimed.tasks import get_task

LONG_QUESTION = " ".join(f"w{i}" for i in range(60))


def write_json(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")


def write_image(path: Path, width: int, height: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (width, height)).save(path)


def _question(folder: str, question: str, answer: str, lang: str = "en", kind: str = "CLOSED") -> dict[str, object]:
    return {"img_id": int(folder[5:]), "img_name": f"{folder}/source.jpg", "question": question, "answer": answer,
            "q_lang": lang, "answer_type": kind, "qid": hash((folder, question)) % 1000}


def slake_unimed(root: Path) -> Path:
    """Uni-Med's processed Slake-VQA folder: ``train.txt`` lists xmlab1 and xmlab2 (xmlab9 is in neither list),
    ``test.txt`` xmlab3; each folder has ``question.json``, ``detection.json`` and ``source.jpg``."""
    (root / "train.txt").parent.mkdir(parents=True, exist_ok=True)
    (root / "train.txt").write_text("xmlab1\n  xmlab2\n", encoding="utf-8")
    (root / "test.txt").write_text("xmlab3\n", encoding="utf-8")
    folders = {
        "xmlab1": ((100, 100), [_question("xmlab1", "Is the liver  healthy?", "Yes"),
                                _question("xmlab1", "肝脏健康吗?", "是", lang="zh"),
                                _question("xmlab1", "Which organ?", "", kind="OPEN"),
                                _question("xmlab1", LONG_QUESTION, "Lung", kind="OPEN")],
                   [{"Liver": [29, 10, 41, 40]}, {"Heart": [0, 0, 100, 100], "Spleen": [1, 1, 2, 2]}]),
        "xmlab2": ((64, 32), [_question("xmlab2", "What modality is this?", "MRI", kind="OPEN")],
                   [{"Right Lung": [8, 4, 16, 8]}]),
        "xmlab3": ((50, 50), [_question("xmlab3", "Is this a CT?", "No")], [{"Brain": [5, 5, 10, 10]}]),
        "xmlab9": ((50, 50), [_question("xmlab9", "Unlisted?", "Yes")], [{"Kidney": [1, 1, 1, 1]}]),
    }
    for folder, ((width, height), questions, detection) in folders.items():
        write_image(root / "imgs" / folder / "source.jpg", width, height)
        write_json(root / "imgs" / folder / "question.json", questions)
        write_json(root / "imgs" / folder / "detection.json", detection)
    return root


SAMED_CT = "ct_00--AbdomenCT1K--Case_00011--x_0041"
SAMED_MR = "mr_t1--BraTS2021--Case_00002--z_0070"
SAMED_TEST = "ct_00--AbdomenCT1K--Case_00099--x_0010"


def samed2d_unimed(root: Path) -> Path:
    """Uni-Med's processed SA-Med2D-20M folders: two modalities in the training split, one image in the test split."""
    regions = {("train", "mr_t1", SAMED_MR, (60, 30)): [{"brain_tumor  core": [6, 3, 30, 15]}],
               ("train", "ct_00", SAMED_CT, (40, 20)): [{"liver": [4, 2, 10, 10]}, {"left_kidney": [0, 0, 40, 20]}],
               ("test", "ct_00", SAMED_TEST, (100, 100)): [{"spleen": [29, 29, 41, 41]}]}
    for (split, modality, image_id, (width, height)), entries in regions.items():
        write_json(root / f"regions_small_{split}" / modality / f"{image_id}.json", entries)
        write_image(root / f"images_small_{split}" / modality / f"{image_id}.png", width, height)
    return root


@pytest.mark.smoke
def test_slake_vqa_reads_the_processed_folder_as_slake_vqa_dataset(tmp_path: Path) -> None:
    """``SlakeVQADataset`` (uni_med/datasets/datasets/slake_vqa_dataset.py): the folders of ``train.txt`` in order,
    each ``question.json``'s rows with ``q_lang == "en"`` and a non-empty answer, the image at ``imgs/<img_name>``,
    question and answer through ``blip_caption_new`` (whitespace collapsed, 50 words)."""
    root = slake_unimed(tmp_path)
    samples = _loaded("slake_vqa", root)
    assert [(s.fields["question"], s.answer, s.meta["answer_type"]) for s in samples] == [
        ("Is the liver healthy?", "Yes", "closed"), (" ".join(LONG_QUESTION.split()[:50]), "Lung", "open"),
        ("What modality is this?", "MRI", "open")]
    assert [s.image for s in samples] == [str(root / "imgs" / f / "source.jpg") for f in ("xmlab1", "xmlab1", "xmlab2")]
    assert [s.image_id for s in samples] == ["slake/xmlab1", "slake/xmlab1", "slake/xmlab2"]
    assert {s.meta["layout"] for s in samples} == {"uni-med"}
    test = _loaded("slake_vqa", root, "test")  # eval_vqa.py: the folders of test.txt, the same filter
    assert [(s.fields["question"], s.answer) for s in test] == [("Is this a CT?", "No")]


def test_slake_rec_and_reg_read_detection_as_refer_slake_dataset(tmp_path: Path) -> None:
    """``ReferSlakeDataset`` / ``InvReferSlakeDataset`` (slake_dataset.py): per folder of ``train.txt``, the first
    ``{object: [x, y, w, h]}`` pair of each ``detection.json`` entry on ``source.jpg``; box text
    ``int(v / size * 100)`` of the corners (29 px of 100 → 28, not 29); REG's answer is the object name."""
    root = slake_unimed(tmp_path)
    rec = _loaded("slake_rec", root)
    assert [(s.fields["object"], s.answer, s.image_id) for s in rec] == [
        ("Liver", "{<28><10><70><50>}", "slake/xmlab1"), ("Heart", "{<0><0><100><100>}", "slake/xmlab1"),
        ("Right Lung", "{<12><12><37><37>}", "slake/xmlab2")]
    assert rec[0].meta["box"] == Box(28, 10, 70, 50) and rec[0].meta["image_size"] == (100, 100)
    assert rec[2].image == str(root / "imgs" / "xmlab2" / "source.jpg") and rec[2].meta["layout"] == "uni-med"
    reg = _loaded("slake_reg", root)
    assert [(s.fields["box"], s.answer) for s in reg] == [(s.answer, s.fields["object"]) for s in rec]
    # ReferSlakeDataset_Eval: test.txt's folders
    assert [(s.fields["object"], s.answer) for s in _loaded("slake_rec", root, "test")] == [("Brain",
                                                                                            "{<10><10><30><30>}")]


def test_slake_layout_is_detected_and_can_be_forced(tmp_path: Path) -> None:
    root = slake_unimed(tmp_path)
    assert detect_layout("slake_vqa", root).name == "uni-med" and detect_layout("slake_vqa", root).original
    write_json(root / "train.json", [_question("xmlab9", "Unlisted?", "Yes")])  # the release's file beside it
    assert detect_layout("slake_vqa", root).name == "uni-med"  # the original's layout wins
    released = _loaded("slake_vqa", root, layout="release")
    assert [(s.fields["question"], s.meta["layout"]) for s in released] == [("Unlisted?", "release")]
    (root / "train.txt").unlink()
    assert detect_layout("slake_rec", root).name == "release" and not detect_layout("slake_rec", root).original
    with pytest.raises(CMoEError, match=r"slake_vqa: the uni-med layout has no 'validate' split"):
        load_dataset("slake_vqa", root, "validate", layout="uni-med")
    with pytest.raises(CMoEError, match=r"slake_rec: unknown layout 'figshare'; use one of auto, uni-med, release"):
        load_dataset("slake_rec", root, layout="figshare")


def test_a_missing_processed_file_names_it_and_quotes_both_layouts(tmp_path: Path) -> None:
    root = slake_unimed(tmp_path)
    (root / "imgs" / "xmlab2" / "detection.json").unlink()  # the original's reader needs one per listed folder
    with pytest.raises(CMoEError) as error:
        load_dataset("slake_reg", root)
    message = str(error.value)
    assert message.startswith(f"slake_reg: missing {root / 'imgs' / 'xmlab2' / 'detection.json'}")
    assert "(uni-med layout)" in message and "{train,test}.txt" in message
    assert "(release layout) the SLAKE 1.0" in message
    (root / "train.txt").unlink()
    (root / "test.txt").write_text("xmlab3")
    with pytest.raises(CMoEError, match=rf"slake_vqa: missing {root / 'train.txt'}"):
        load_dataset("slake_vqa", root)  # another split's list is there: the folder is read as uni-med
    assert "Uni-Med's processed Slake-VQA folder" in LAYOUTS["slake_vqa"]


def test_samed2d_reads_region_files_as_refer_sa_med_dataset(tmp_path: Path) -> None:
    """``ReferSAMedDataset`` / ``InvReferSAMedDataset`` (sa_med_dataset.py): every ``<modality>/<id>.json`` of
    ``regions_small_train`` (we sort modalities and files), the first pair of each entry, the image
    ``images_small_train/<modality>/<id>.png``; object names through ``blip_caption_new`` (underscores kept)."""
    root = samed2d_unimed(tmp_path)
    rec = _loaded("samed2d_rec", root)
    assert [(s.fields["object"], s.answer, s.meta["modality"]) for s in rec] == [
        ("liver", "{<10><10><35><60>}", "ct_00"), ("left_kidney", "{<0><0><100><100>}", "ct_00"),
        ("brain_tumor core", "{<10><10><60><60>}", "mr_t1")]
    assert rec[0].image == str(root / "images_small_train" / "ct_00" / f"{SAMED_CT}.png")
    assert rec[0].image_id == f"samed2d/{SAMED_CT}" and rec[0].meta["image_size"] == (40, 20)
    reg = _loaded("samed2d_reg", root)
    assert [(s.fields["box"], s.answer) for s in reg] == [(s.answer, s.fields["object"]) for s in rec]
    test = _loaded("samed2d_rec", root, "test")  # ReferSAMedDataset_Eval on regions_small_test
    assert [(s.fields["object"], s.answer) for s in test] == [("spleen", "{<28><28><70><70>}")]
    assert len(_loaded("samed2d_rec", root, "all")) == 4
    assert detect_layout("samed2d_reg", root).name == "uni-med"
    assert detect_layout("samed2d_reg", tmp_path / "nothing").name == "release"


def test_samed2d_skips_what_is_not_a_region_file_and_names_a_missing_image(tmp_path: Path) -> None:
    root = samed2d_unimed(tmp_path)
    (root / "regions_small_train" / "README.txt").write_text("notes")
    (root / "regions_small_train" / "ct_00" / ".DS_Store").write_text("x")
    assert len(_loaded("samed2d_rec", root)) == 3
    (root / "images_small_train" / "mr_t1" / f"{SAMED_MR}.png").unlink()
    with pytest.raises(CMoEError, match=rf"samed2d_rec: missing .*images_small_train/mr_t1/{SAMED_MR}\.png"):
        load_dataset("samed2d_rec", root)
    shutil.rmtree(root / "regions_small_test")
    with pytest.raises(CMoEError, match=rf"samed2d_reg: missing {root / 'regions_small_test'}"):
        load_dataset("samed2d_reg", root, "test")


def test_qa_instruction_is_cut_to_50_words_as_the_original(tmp_path: Path) -> None:
    """``MedQADataset`` (medqa_dataset.py) passes the whole instruction, ``[qa] <template> <question>``, through
    ``blip_caption_new``: 50 words, of which our template takes 12."""
    question = " ".join(f"q{i}" for i in range(100))
    path = tmp_path / "questions" / "US" / "train.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"question": question, "answer": "A", "options": {}, "answer_idx": "A"}) + "\n")
    cut = _loaded("medqa", tmp_path)[0]
    instruction = get_task("qa").instruction(**cut.fields)
    assert len(instruction.split()) == 50 and instruction.split()[-1] == "q37"
    assert _loaded("medqa", tmp_path, instruction_words=None)[0].fields["question"] == question  # ours: whole
    with pytest.raises(CMoEError, match="instruction_words"):
        load_dataset("medqa", tmp_path, instruction_words=0)


def _npz(path: Path, count: int, label: int) -> None:
    images = np.zeros((count, 4, 4, 3), dtype=np.uint8)
    labels = np.full((count, 1), label, dtype=np.uint8)
    np.savez(path, train_images=images, train_labels=labels, val_images=images[:1], val_labels=labels[:1],
             test_images=images[:1], test_labels=labels[:1])


def test_medmnist_is_one_source_drawn_by_size(tmp_path: Path) -> None:
    """``MedMNISTDataset_2D_small`` (medmnist_dataset.py) concatenates DermaMNIST and OrganSMNIST into one dataset
    with ratio 4 (train_configs/uni_med.yaml), so each set's share of its batches follows its size."""
    _npz(tmp_path / "dermamnist_224.npz", 30, 0)
    _npz(tmp_path / "organsmnist_224.npz", 60, 1)
    entries = [DatasetEntry("dermamnist", str(tmp_path), 4, mix_source="medmnist_2d_small"),
               DatasetEntry("organsmnist", str(tmp_path), 4, mix_source="medmnist_2d_small"),
               DatasetEntry("medqa", str(_medqa(tmp_path / "MedQA")), 2)]
    section = DataSection(datasets=entries)
    samples = load_split(section, "train")
    assert {s.source for s in samples} == {"dermamnist", "organsmnist", "medqa"}  # evaluation keeps them apart
    sampler = TaskRatioSampler(samples, 4, 42, section.mixing_ratios(), groups=section.mixing_groups())
    assert sampler.probabilities == pytest.approx({"medmnist_2d_small": 4 / 6, "medqa": 2 / 6})
    batches = [[samples[i].source for i in batch] for batch in sampler.take(900)]
    drawn = [source for batch in batches for source in batch if source != "medqa"]
    assert drawn.count("dermamnist") / len(drawn) == pytest.approx(30 / 90, abs=0.02)
    assert any({"dermamnist", "organsmnist"} <= set(batch) for batch in batches)  # both sets within one batch
    # ours: two sources, half and half
    ours = DataSection(datasets=[DatasetEntry("dermamnist", str(tmp_path), 2),
                                 DatasetEntry("organsmnist", str(tmp_path), 2)])
    split = TaskRatioSampler(load_split(ours, "train"), 4, 42, ours.mixing_ratios(), groups=ours.mixing_groups())
    assert split.probabilities == pytest.approx({"dermamnist": 0.5, "organsmnist": 0.5})
    with pytest.raises(CMoEError, match=r"mix source 'medmnist_2d_small'.*share one ratio"):
        DataSection(datasets=[DatasetEntry("dermamnist", str(tmp_path), 4, mix_source="medmnist_2d_small"),
                              DatasetEntry("organsmnist", str(tmp_path), 2, mix_source="medmnist_2d_small")])


def _medqa(root: Path) -> Path:
    path = root / "questions" / "US" / "train.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"question": "Q?", "answer": "A", "options": {}, "answer_idx": "A"}) + "\n")
    return root
