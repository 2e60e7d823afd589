"""A run that says what it is: the resume line (from which step to which, what the schedule does), the loss and
per-task loss curves as PNG, and TensorBoard scalars through the optional logger."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cmoe.reference_models.unimed.training.curves import TensorBoardLog, plot_curves, read_metrics
from cmoe.reference_models.unimed.training.train import Trainer

from unimed_tiny import test_config as tiny_config


def test_a_resumed_run_says_from_where_to_where_and_what_the_schedule_does(tmp_path: Path, capsys) -> None:
    Trainer(tiny_config(tmp_path, train__steps=4, train__save_every=4)).train()
    assert "resuming" not in capsys.readouterr().out
    Trainer(tiny_config(tmp_path, train__steps=4, train__save_every=2)).train(steps=6)
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("resuming"))
    assert f"resuming {tmp_path} from step_00000004 (step 4) to step 6" in line
    assert "steps past train.steps (4) keep the schedule's end, min_lr 0.0001" in line
    Trainer(tiny_config(tmp_path, train__steps=10, train__save_every=2)).train(steps=8)
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("resuming"))
    assert "from step_00000006 (step 6) to step 8; train.steps is now 10 (it was 4)" in line
    assert "past train.steps" not in line
    curves = sorted(path.name for path in (tmp_path / "curves").iterdir())
    assert curves == ["loss.png", "task_loss.png"]
    picture = np.asarray(Image.open(tmp_path / "curves" / "task_loss.png").convert("RGB"))
    assert picture.std() > 10  # not blank: axes, lines and labels
    steps = [record["step"] for record in read_metrics(tmp_path / "metrics.jsonl")]
    assert steps[-1] == 8 and steps == sorted(steps)


def test_curves_of_an_empty_log_are_nothing(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text("not json\n")
    assert plot_curves(tmp_path / "metrics.jsonl", tmp_path / "curves") == []


class RecordingWriter:
    def __init__(self) -> None:
        self.scalars: list[tuple[str, float, int]] = []
        self.closed = False

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.scalars.append((tag, value, step))

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def test_tensorboard_log_writes_each_scalar_of_a_record() -> None:
    writer = RecordingWriter()
    log = TensorBoardLog("unused", writer=writer)
    log.log({"step": 3, "loss": 1.5, "aux_loss": 0.0, "lr": 1e-3, "task_loss": {"vqa": 1.2, "rec": 2.0},
             "routing": {"vqa": [0.25, 0.75]}, "samples_per_s": 10.0, "grad_norm": None})
    log.close()
    assert ("train/loss", 1.5, 3) in writer.scalars and ("task_loss/rec", 2.0, 3) in writer.scalars
    assert ("routing/vqa/expert_1", 0.75, 3) in writer.scalars
    assert not any(tag == "train/grad_norm" for tag, _, _ in writer.scalars) and writer.closed


def test_without_tensorboard_the_log_is_silent(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from cmoe.reference_models.unimed.training import curves

    monkeypatch.setattr(curves, "tensorboard_available", lambda: False)
    log = TensorBoardLog(tmp_path)
    log.log({"step": 1, "loss": 1.0})
    log.close()
    assert not (tmp_path / "tensorboard").exists()


def test_eval_names_the_checkpoint_it_fell_back_to(tmp_path: Path) -> None:
    from cmoe.reference_models.unimed.evaluation.evaluate import run_evaluation

    config = tiny_config(tmp_path, train__steps=4, train__save_every=2)
    Trainer(config).train()
    (tmp_path / "step_00000004" / "trainable.safetensors").write_bytes(b"damaged")
    evaluated = run_evaluation(config, limit_per_task=1)
    assert evaluated.checkpoint.name == "step_00000002" and evaluated.step == 2
    assert evaluated.path == tmp_path / "eval" / "step_00000002-cmoe"
    table = (evaluated.path / "eval.md").read_text()
    assert f"Checkpoint: {tmp_path / 'step_00000002'} (step 2)." in table
    assert "names step_00000004, which is incomplete or damaged; scored step_00000002" in table
    import json

    written = json.loads((evaluated.path / "eval.json").read_text())["checkpoint"]
    assert written["step"] == 2 and "damaged" in written["note"]
