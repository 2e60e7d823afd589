"""A reader of a run's latest checkpoint (eval, the predictor, the tug-of-war analysis) while the training run
saves and prunes (``train.keep_checkpoints``): when the checkpoint it read goes away mid-read and ``latest`` has
moved on, it reads the new latest; a checkpoint that fails while ``latest`` still names it raises as before."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest

from cmoe import CMoEError
from cmoe.reference_models.unimed.evaluation import evaluate
from cmoe.reference_models.unimed.inference import predictor as predictor_module
from cmoe.reference_models.unimed.inference.predictor import UniMedPredictor
from cmoe.reference_models.unimed.model import checkpoint as checkpoint_module

from unimed_tiny import test_config as tiny_config


def _copy(run: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "run"
    shutil.copytree(run, folder)
    return folder


def _pruned_while_read(module, monkeypatch: pytest.MonkeyPatch, folder: Path) -> list[Path]:
    """The first read of a checkpoint in `module` meets a training run that saved a newer checkpoint, pointed
    ``latest`` at it and pruned the one being read."""
    real, reads = module.read_checkpoint, []

    def read(path):
        reads.append(Path(path))
        if len(reads) == 1:
            newer = folder / "step_00000009"
            shutil.copytree(path, newer)
            (folder / "latest").write_text(newer.name + "\n")
            shutil.rmtree(path)
        return real(path)

    monkeypatch.setattr(module, "read_checkpoint", read)
    return reads


def test_eval_reads_the_new_latest_when_training_prunes_the_one_it_reads(run: Path, tmp_path: Path, monkeypatch,
                                                                          caplog) -> None:
    folder = _copy(run, tmp_path)
    first = checkpoint_module.find_latest(folder)
    reads = _pruned_while_read(evaluate, monkeypatch, folder)
    with caplog.at_level(logging.WARNING, logger="cmoe.unimed.checkpoint"):
        path, model, step = evaluate.load_checkpoint_model(tiny_config(folder, train__steps=4), None)
    assert [p.name for p in reads] == [first.name, "step_00000009"] and path.name == "step_00000009"
    assert step == 4 and model is not None
    assert f"{first.name} went away while it was read" in caplog.text


def test_the_predictor_from_a_run_reads_the_new_latest_too(run: Path, tmp_path: Path, monkeypatch) -> None:
    folder = _copy(run, tmp_path)
    _pruned_while_read(predictor_module, monkeypatch, folder)
    assert UniMedPredictor.from_run(folder).checkpoint.name == "step_00000009"


def test_a_damaged_latest_that_training_did_not_move_raises(run: Path, tmp_path: Path, monkeypatch) -> None:
    folder = _copy(run, tmp_path)
    latest = checkpoint_module.find_latest(folder)

    def damaged(path):
        raise CMoEError(f"{path}: damaged")

    monkeypatch.setattr(evaluate, "read_checkpoint", damaged)
    with pytest.raises(CMoEError, match=f"{latest.name}: damaged"):
        evaluate.load_checkpoint_model(tiny_config(folder, train__steps=4), None)
