"""``cmoe unimed check-data``: the paper config on a data root laid out as the original's README and
``uni_med/configs/datasets/*.yaml`` say (tiny copies of all twelve datasets), and the same root with a piece
removed."""

from __future__ import annotations

import csv
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from test_unimed_original_layouts import samed2d_unimed, slake_unimed, write_image, write_json

from cmoe.reference_models.unimed.cli import main
from cmoe.reference_models.unimed.config import load_config
from cmoe.reference_models.unimed.data.check import check_data


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def _csv(path: Path, rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows([["name", "context", "type"], *rows])


def _npz(path: Path, train: int, label: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    images = np.zeros((train, 4, 4, 3), dtype=np.uint8)
    labels = np.full((train, 1), label, dtype=np.uint8)
    np.savez(path, train_images=images, train_labels=labels, val_images=images[:1], val_labels=labels[:1],
             test_images=images[:1], test_labels=labels[:1])


def original_data_root(root: Path) -> Path:
    """Every dataset of the paper config where the original's configs point (``path/dataset/...``)."""
    qa = {"question": "Which drug?", "answer": "Aspirin", "options": {"A": "Aspirin"}, "answer_idx": "A"}
    _jsonl(root / "MedQA" / "questions" / "US" / "train.jsonl", [qa, qa])
    _jsonl(root / "MedQA" / "questions" / "US" / "test.jsonl", [qa])
    pubmed = {"QUESTION": "Does it work?", "final_decision": "yes"}
    write_json(root / "PubMedQA" / "train_set.json", {"1": pubmed, "2": pubmed})
    write_json(root / "PubMedQA" / "test_set.json", {"3": pubmed})
    slake_unimed(root / "Slake-VQA")
    for split in ("train", "test"):
        rows = [{"img_id": f"{split}_0001", "sent": "Is it?", "label": {"yes": 1.0}, "answer_type": "yes/no",
                 "question_id": 1}]
        (root / "Path-VQA" / "qas").mkdir(parents=True, exist_ok=True)
        (root / "Path-VQA" / "qas" / f"{split}_vqa.pkl").write_bytes(pickle.dumps(rows))
        write_image(root / "Path-VQA" / "images" / split / f"{split}_0001.jpg", 16, 16)
    samed2d_unimed(root / "SA-Med2D-20M")
    for split in ("train", "test"):
        _csv(root / "MedPix" / "data_csv" / f"MedPix_single_{split}.csv", [[f"{split}.png", "A mass.", "caption"]])
        write_image(root / "MedPix" / "MedPix" / "images" / f"{split}.png", 16, 16)
    image = "p10/p10000032/s50414267/a.jpg"
    write_json(root / "MIMIC_caption" / "annotation_small.json",
               {"train": [{"image_path": [image], "report": "No acute findings."}],
                "test": [{"image_path": [image], "report": "Clear lungs."}]})
    # the original scores annotation.json's test split (the paper config's eval_annotation)
    write_json(root / "MIMIC_caption" / "annotation.json",
               {"train": [], "test": [{"image_path": [image], "report": "Clear lungs."}]})
    write_image(root / "MIMIC-CXR-JPG" / "2.0.0" / "files" / image, 16, 16)
    _npz(root / "MedMNIST" / "dermamnist_224.npz", 3, 0)
    _npz(root / "MedMNIST" / "organsmnist_224.npz", 6, 1)
    return root


@pytest.fixture
def data_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("UNIMED_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("UNIMED_MODELS", str(tmp_path / "models"))
    return original_data_root(tmp_path / "data")


@pytest.mark.smoke
def test_the_paper_config_can_train_on_the_original_layout(data_root: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["check-data", "--config", "paper"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("models (training and evaluation load them; reading the data does not):\n")
    assert f"  LLM hf_causal_lm: {data_root.parent / 'models' / 'Llama-2-7b-chat-hf'} (missing)" in out
    table = out.split("\nmix (")[0].split("evaluation split 'test'\n")[1].splitlines()[1:]
    lines = {line.split()[0]: line for line in table}
    assert len(lines) == 12
    assert "uni-med (the original's)" in lines["slake_vqa"] and "uni-med (the original's)" in lines["samed2d_reg"]
    assert lines["medqa"].split()[1:4] == ["release", "(the", "original's)"]
    assert lines["slake_vqa"].split()[4:6] == ["3", "1"]  # train, test entries
    assert lines["dermamnist"].split()[4:6] == ["3", "1"] and lines["organsmnist"].split()[4:6] == ["6", "1"]
    assert "medmnist_2d_small 8.0%: dermamnist 33.3%, organsmnist 66.7% of its entries, by size" in out
    assert "medpix 16.0%" in out and "dermamnist 4.0%" not in out
    data_part = out.split("evaluation split 'test'\n")[1]
    assert "missing" not in data_part and out.rstrip().splitlines()[-1].startswith("can train: 12 dataset(s)")


def test_a_missing_piece_stops_the_config_naming_the_file(data_root: Path, capsys: pytest.CaptureFixture) -> None:
    (data_root / "Slake-VQA" / "train.txt").unlink()
    assert main(["check-data", "--config", "paper"]) == 2
    captured = capsys.readouterr()
    error = captured.err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("error: unimed-paper: cannot train, 3 problem(s)")
    assert str(data_root / "Slake-VQA" / "train.txt") in error[0]
    # one line for the three datasets the missing file stops
    assert (f"  slake_vqa [train], slake_rec [train], slake_reg [train]: missing "
            f"{data_root / 'Slake-VQA' / 'train.txt'}; expected the uni-med") in captured.out


def test_a_missing_evaluation_file_is_reported_but_training_can_run(data_root: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    (data_root / "PubMedQA" / "test_set.json").unlink()
    (data_root / "MIMIC-CXR-JPG" / "2.0.0" / "files" / "p10" / "p10000032" / "s50414267" / "a.jpg").unlink()
    config = load_config("paper")
    check = check_data(config.data)
    assert not check.can_train
    problems = {(d.name, split): s for d in check.datasets for split, s in d.splits.items() if s.problem}
    assert set(problems) == {("pubmedqa", "test"), ("mimic_cxr", "train"), ("mimic_cxr", "test")}
    assert problems["pubmedqa", "test"].missing == data_root / "PubMedQA" / "test_set.json"
    write_image(data_root / "MIMIC-CXR-JPG" / "2.0.0" / "files" / "p10" / "p10000032" / "s50414267" / "a.jpg", 8, 8)
    assert main(["check-data", "--config", "paper"]) == 0
    assert "pubmedqa [test] (evaluation only: training is not affected)" in capsys.readouterr().out


def test_unset_variables_are_named_once_with_the_export_that_fixes_them(tmp_path: Path, monkeypatch,
                                                                       capsys: pytest.CaptureFixture) -> None:
    monkeypatch.delenv("UNIMED_DATA", raising=False)
    monkeypatch.delenv("UNIMED_MODELS", raising=False)
    monkeypatch.chdir(tmp_path)
    assert main(["check-data", "--config", "paper"]) == 2
    out = capsys.readouterr().out
    assert out.count("UNIMED_DATA is not set") == 1 and "export UNIMED_DATA=/path/to/datasets" in out
    assert out.count("UNIMED_MODELS is not set") == 1 and "export UNIMED_MODELS=/path/to/models" in out
    assert "  vision encoder eva_clip_g: ${UNIMED_MODELS}/eva_vit_g.pth (missing)" in out
    assert out.count("expected either (uni-med layout) Uni-Med's processed Slake-VQA folder") == 1


def test_check_data_reads_the_synthetic_set_and_data_stats_names_layouts(data_root: Path,
                                                                         capsys: pytest.CaptureFixture) -> None:
    assert main(["check-data", "--config", "tiny", "--set", "data.synthetic.num_images=40",
                 "--set", "data.synthetic.qa_questions=10", "--set", "data.synthetic.eval_images=8"]) == 0
    out = capsys.readouterr().out
    assert "synthetic  built-in" in out and "can train: 1 dataset(s)" in out
    assert main(["data-stats", "--config", "paper"]) == 0
    assert "layouts: medqa release, pubmedqa release, slake_vqa uni-med" in capsys.readouterr().out


def test_a_folder_in_neither_layout_names_the_original_s_file_first(data_root: Path) -> None:
    for name in ("train.txt", "test.txt"):
        (data_root / "Slake-VQA" / name).unlink()
    check = check_data(load_config("paper").data)
    slake = next(d for d in check.datasets if d.name == "slake_rec")
    assert slake.layout is None
    assert slake.splits["train"].summary == (f"missing {data_root / 'Slake-VQA' / 'train.txt'} "
                                             f"(or {data_root / 'Slake-VQA' / 'train.json'}, release layout)")
