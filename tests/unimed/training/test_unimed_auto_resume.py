"""A resumed run computes with the backends the run started with: ``auto``'s measured choices are kept in the
run folder, so timing noise in the new process cannot switch backends (and break bit-exact resume)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cmoe import auto
from cmoe.errors import CMoEError
from cmoe.reference_models.unimed.training.train import AUTO_CHOICES_FILE, Trainer
from unimed_tiny import test_config as tiny_config


class PreferringTimer:
    """Says `fastest` is the fastest backend; counts the timed calls."""

    def __init__(self, fastest: str):
        self.fastest, self.calls = fastest, 0

    def __call__(self, name, call, device) -> float:
        call()
        self.calls += 1
        return 1.0 if name == self.fastest else 5.0


def test_resumed_training_reuses_the_run_s_backend_choices(tmp_path: Path, fresh_selector: None) -> None:
    run = dict(train__steps=4, train__save_every=2, train__backend_choice="measure")
    first = auto.configure_auto(timer=PreferringTimer("grouped_mm")).timer
    Trainer(tiny_config(tmp_path, **run)).train(steps=2)
    recorded = json.loads((tmp_path / AUTO_CHOICES_FILE).read_text())["entries"]
    assert first.calls > 0 and recorded
    assert {entry["backend"] for entry in recorded.values()} == {"grouped_mm"}

    # A new process whose timer would now pick `sorted`: the resumed run reads the run's choices, times nothing.
    second = auto.configure_auto(timer=PreferringTimer("sorted")).timer
    Trainer(tiny_config(tmp_path, **run)).train()
    assert second.calls == 0
    assert json.loads((tmp_path / AUTO_CHOICES_FILE).read_text())["entries"] == recorded
    # Outside training the process-wide selector is back, with its own (empty) choices.
    assert auto.selector().timer is second and not auto.auto_choices()


def test_a_cache_file_the_user_set_is_kept(tmp_path: Path, fresh_selector: None) -> None:
    mine = tmp_path / "mine.json"
    auto.configure_auto(cache_path=mine, timer=PreferringTimer("sorted"))
    Trainer(tiny_config(tmp_path / "run", train__steps=1, train__save_every=1,
                        train__backend_choice="measure")).train()
    assert mine.exists() and not (tmp_path / "run" / AUTO_CHOICES_FILE).exists()


def test_the_table_choice_times_nothing_so_separate_runs_compute_alike(tmp_path: Path, fresh_selector: None) -> None:
    # The tiny configs' default: whatever the timer would say, both runs use the fixed rule's backend.
    timer = auto.configure_auto(timer=PreferringTimer("grouped_mm")).timer
    config = tiny_config(tmp_path / "a", train__steps=1, train__save_every=1)
    assert config.train.backend_choice == "table"
    Trainer(config).train()
    assert timer.calls == 0 and not (tmp_path / "a" / AUTO_CHOICES_FILE).exists()
    assert auto.selector().current_mode() == "measure"  # the process-wide mode is back after the run


def test_backend_choice_must_be_measure_or_table(tmp_path: Path) -> None:
    with pytest.raises(CMoEError, match=r"train.backend_choice.*measure .*table"):
        tiny_config(tmp_path, train__backend_choice="fastest")
