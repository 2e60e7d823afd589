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


@pytest.mark.slow
def test_each_rank_resumes_with_the_backends_it_chose(tmp_path: Path) -> None:
    """Two ranks whose timers prefer different backends: each records its own choices, and a resumed run (whose
    timers now prefer the other backend) computes bit for bit as the straight run. One shared file kept the last
    writer's choices, so one rank resumed with the other's backend."""
    import os
    import subprocess
    import sys

    import torch
    from safetensors.torch import load_file

    worker = Path(__file__).resolve().parents[2] / "support" / "unimed_auto_rank_worker.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CMOE_DISABLE_PLUGINS": os.environ.get("CMOE_DISABLE_PLUGINS", "")}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(worker), str(tmp_path)], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for folder in ("straight", "resumed"):
        chosen = [{entry["backend"] for entry in json.loads((tmp_path / folder / name).read_text())["entries"].values()}
                  for name in (AUTO_CHOICES_FILE, "auto_backends.rank1.json")]
        assert chosen == [{"grouped_mm"}, {"sorted"}]
    for rank in (0, 1):
        straight, resumed = (load_file(str(tmp_path / f"{run}_rank{rank}.safetensors")) for run in ("straight", "resumed"))
        assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)
