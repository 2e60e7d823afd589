"""What ``cmoe unimed train`` says when there is nothing to do, and when a run resumes with another seed or data."""

from __future__ import annotations

from pathlib import Path

import pytest

from cmoe.reference_models.unimed.cli import main
from cmoe.reference_models.unimed.model.checkpoint import resume_note
from cmoe.reference_models.unimed.training.train import Trainer
from unimed_tiny import test_config as tiny_config

SMALL = ["--set", "data.synthetic.num_images=40", "--set", "data.synthetic.qa_questions=10",
         "--set", "data.synthetic.eval_images=8", "--set", "train.batch_size=4", "--set", "train.steps=1",
         "--set", "train.save_every=1", "--set", "train.warmup_steps=0", "--set", "train.progress=false"]


@pytest.mark.smoke
def test_re_running_a_finished_run_says_there_is_nothing_to_do(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args = ["train", "--config", "tiny", "--output-dir", str(tmp_path), *SMALL]
    assert main(args) == 0
    assert "trained to step 1" in capsys.readouterr().out
    assert main(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines == [f"nothing to do: {tmp_path} is already at step 1 (training stops at step 1); raise --steps or "
                     "train.steps to train further, or pass another --output-dir"]  # and no model was built
    assert main([*args, "--steps", "0"]) == 0
    assert capsys.readouterr().out.startswith("nothing to do:")


def test_resuming_with_another_seed_or_data_says_what_it_keeps(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    Trainer(tiny_config(tmp_path, train__steps=1, train__save_every=1)).train()
    same = Trainer(tiny_config(tmp_path, train__steps=2, train__save_every=1))
    same.setup()
    assert "resuming" not in capsys.readouterr().out
    changed = tiny_config(tmp_path, train__steps=2, train__save_every=1)
    changed.seed = 7
    changed.data.synthetic["qa_questions"] = 30
    result = Trainer(changed).train()
    out = capsys.readouterr().out
    assert result.step == 2
    assert ("resuming from step_00000001 (step 1) with a changed seed and data (seed 42 → 7; "
            "data.synthetic.qa_questions 40 → 30): kept from the checkpoint: the weights, optimiser, schedule, RNG "
            "state and step; the new seed and data choose the batches from here on") in out


def test_the_resume_note_lists_a_few_data_keys() -> None:
    saved = {"seed": 1, "data": {"datasets": [{"name": "a", "options": {"limit": k}} for k in range(6)]}}
    now = {"seed": 1, "data": {"datasets": [{"name": "a", "options": {"limit": k + 1}} for k in range(6)]}}
    note = resume_note({"step": 5, "config": saved}, now, "run/step_00000005")
    assert note.startswith("resuming from step_00000005 (step 5) with changed data (data.datasets[0].options.limit "
                           "0 → 1; ")
    assert "and 2 more data key(s)" in note and "seed" not in note.split(":")[0]
    assert resume_note({"step": 5, "config": saved}, saved, "x") is None
    assert resume_note({"step": 5}, now, "x") is None
