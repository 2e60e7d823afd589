"""Audit: training checkpoints (written by the recipe's `save_checkpoint`) under every fault that can hit a run
directory: ``latest`` missing, garbage or dangling; stray higher-numbered folders; damaged, truncated or
incomplete checkpoints; leftovers of killed saves. Resume must pick the newest good checkpoint (with a log
line) or raise a `CMoEError` naming the file; nothing may be deleted that is still needed, and reading changes
nothing (leftovers are the owner's to remove: the training start, for its own host's dead writers)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from robustness_audit import assert_clear, exited_writer, flip_bit, leftover_name, snapshot, truncate

from cmoe import CMoEError
from cmoe.leftovers import OLD, TMP, current_writer, process_start
from cmoe.reference_models.unimed.model.checkpoint import (
    clean_run_folder,
    find_latest,
    list_checkpoints,
    load_trainable,
    load_training_state,
    read_checkpoint,
    save_checkpoint,
)


class Toy(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.frozen = torch.nn.Linear(3, 3)
        self.frozen.requires_grad_(False)
        self.head = torch.nn.Linear(3, 2)


def _train(model: Toy, optimizer, scheduler, steps: int) -> None:
    for _ in range(steps):
        loss = model.head(model.frozen(torch.randn(4, 3))).pow(2).mean()
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    model = Toy()
    optimizer = torch.optim.AdamW(model.head.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    return model, optimizer, scheduler


def _run(out: Path, steps: tuple[int, ...] = (1, 2, 3), keep: int | None = None) -> dict[int, dict]:
    """Checkpoints at `steps`; returns the head weights at each."""
    model, optimizer, scheduler = _setup()
    done, weights = 0, {}
    for step in steps:
        _train(model, optimizer, scheduler, min(step - done, 3))  # the step number need not be the work done
        done = step
        save_checkpoint(out, step, model, optimizer, scheduler, {}, keep=keep)
        weights[step] = {k: v.clone() for k, v in model.head.state_dict().items()}
    return weights


def _resume_step(out: Path) -> int:
    path = find_latest(out)
    parts = read_checkpoint(path)
    model, optimizer, scheduler = _setup()
    load_trainable(model, parts)
    return load_training_state(parts, optimizer, scheduler)["step"]


POINTERS = {"missing": None, "empty": b"", "garbage text": b"hello world\n", "binary": b"\xff\xfe\x00\x01",
            "dangling": b"step_00000099\n", "parent path": b"../step_00000003\n", "names a file": b"state.json\n",
            "a directory": "dir", "partial name": b"step_0000\n", "whitespace": b"   \n"}


@pytest.mark.parametrize("kind", list(POINTERS))
def test_a_bad_latest_pointer_falls_back_to_the_newest_checkpoint(tmp_path, caplog, kind: str) -> None:
    _run(tmp_path)
    latest = tmp_path / "latest"
    latest.unlink()
    if POINTERS[kind] == "dir":
        latest.mkdir()
    elif POINTERS[kind] is not None:
        latest.write_bytes(POINTERS[kind])
    with caplog.at_level(logging.WARNING, logger="cmoe"):
        assert find_latest(tmp_path).name == "step_00000003"
        assert _resume_step(tmp_path) == 3
    if POINTERS[kind] is not None:
        assert "latest" in caplog.text


DAMAGE = [("trainable.safetensors", "flip", 100), ("trainable.safetensors", "flip", -1),
          ("trainable.safetensors", "truncate", 0.5), ("trainable.safetensors", "delete", None),
          ("optimizer.safetensors", "flip", -3), ("optimizer.safetensors", "truncate", 0.0),
          ("optimizer.safetensors", "delete", None), ("rng.safetensors", "flip", 50),
          ("rng.safetensors", "delete", None), ("state.json", "flip", 10), ("state.json", "truncate", 0.7),
          ("state.json", "delete", None), ("checksums.json", "truncate", 0.5), ("checksums.json", "flip", 3)]


def _damage(path: Path, how: str, amount) -> None:
    if how == "flip":
        flip_bit(path, amount)
    elif how == "truncate":
        truncate(path, amount)
    else:
        path.unlink()


@pytest.mark.parametrize("name,how,amount", DAMAGE, ids=[f"{n}-{h}-{a}" for n, h, a in DAMAGE])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_good_one(tmp_path, caplog, name, how, amount):
    _run(tmp_path)
    _damage(tmp_path / "step_00000003" / name, how, amount)
    with caplog.at_level(logging.WARNING, logger="cmoe"):
        assert _resume_step(tmp_path) == 2
    assert "step_00000003" in caplog.text and "previous" in caplog.text
    assert (tmp_path / "step_00000003").is_dir(), "a damaged checkpoint is kept for inspection, not deleted"


@pytest.mark.parametrize("name,how,amount", DAMAGE, ids=[f"{n}-{h}-{a}" for n, h, a in DAMAGE])
def test_reading_a_damaged_checkpoint_names_the_file(tmp_path, name, how, amount) -> None:
    _run(tmp_path)
    _damage(tmp_path / "step_00000003" / name, how, amount)
    with pytest.raises(CMoEError) as error:
        read_checkpoint(tmp_path / "step_00000003")
    assert_clear(error.value, name)


def test_every_checkpoint_damaged_is_an_error_not_a_silent_restart(tmp_path) -> None:
    _run(tmp_path)
    for _, path in list_checkpoints(tmp_path):
        flip_bit(path / "trainable.safetensors", -1)
    with pytest.raises(CMoEError) as error:
        find_latest(tmp_path)
    assert_clear(error.value, "trainable.safetensors", str(tmp_path))


LEGACY = [("optimizer.safetensors", "optimizer.safetensors"), ("rng.safetensors", "rng.safetensors")]


@pytest.mark.parametrize("name,named", LEGACY)
def test_a_checkpoint_without_checksums_missing_a_state_file_names_it(tmp_path, name: str, named: str) -> None:
    _run(tmp_path)
    checkpoint = tmp_path / "step_00000003"
    (checkpoint / "checksums.json").unlink()
    (checkpoint / name).unlink()
    parts = read_checkpoint(checkpoint)
    model, optimizer, scheduler = _setup()
    with pytest.raises(CMoEError) as error:
        load_training_state(parts, optimizer, scheduler)
    assert_clear(error.value, named)


STATES = {"not JSON": "{", "a list": "[]", "no step": "{}", "step a string": '{"step": "3"}',
          "no optimizer": None}


@pytest.mark.parametrize("kind", list(STATES))
def test_a_bad_state_json_without_checksums_names_it(tmp_path, kind: str) -> None:
    _run(tmp_path)
    checkpoint = tmp_path / "step_00000003"
    (checkpoint / "checksums.json").unlink()
    state = checkpoint / "state.json"
    if STATES[kind] is None:
        data = json.loads(state.read_text())
        del data["optimizer"]
        state.write_text(json.dumps(data))
    else:
        state.write_text(STATES[kind])
    with pytest.raises(CMoEError) as error:
        parts = read_checkpoint(checkpoint)
        load_training_state(parts, *_setup()[1:])
    assert_clear(error.value, "state.json")


@pytest.mark.parametrize("keep", [1, 2, 3])
def test_keep_last_sorts_by_step_number_and_spares_newer_folders(tmp_path, keep: int) -> None:
    _run(tmp_path / "other", steps=(500,))
    shutil.move(tmp_path / "other" / "step_00000500", tmp_path / "step_00000500")
    # A 9-digit step sorts before 8-digit ones by name, after them by number.
    _run(tmp_path / "big", steps=(100000000,))
    shutil.move(tmp_path / "big" / "step_100000000", tmp_path / "step_100000000")
    _run(tmp_path, steps=(1, 2, 3, 4), keep=keep)
    steps = [step for step, _ in list_checkpoints(tmp_path)]
    assert steps == list(range(4 - keep + 1, 5)) + [500, 100000000]
    assert find_latest(tmp_path).name == "step_00000004"


def test_a_missing_latest_with_many_checkpoints_picks_the_highest_step_not_the_last_name(tmp_path) -> None:
    _run(tmp_path, steps=(9, 10))
    shutil.copytree(tmp_path / "step_00000010", tmp_path / "step_100000000")
    (tmp_path / "latest").unlink()
    assert find_latest(tmp_path).name == "step_100000000"


def _make(folder: Path, name: str) -> Path:
    junk = folder / name
    if ".latest." in name:
        junk.write_text("step_0000")
    else:
        junk.mkdir()
        (junk / "trainable.safetensors").write_bytes(b"0" * 4096)
    return junk


KILLED = [("step_00000004", TMP), ("step_00000002", OLD), ("latest", TMP)]


@pytest.mark.parametrize("target,kind", KILLED, ids=[f"{t}-{k}" for t, k in KILLED])
def test_leftovers_of_killed_saves_are_named_by_readers_and_removed_by_the_next_start(tmp_path, caplog, target, kind):
    _run(tmp_path)
    junk = _make(tmp_path, leftover_name(target, kind, exited_writer()))
    before = snapshot(tmp_path)
    with caplog.at_level(logging.WARNING, logger="cmoe"):
        assert find_latest(tmp_path).name == "step_00000003"
    assert snapshot(tmp_path) == before, "a reader changed the run folder"
    assert junk.name in caplog.text and f"cmoe unimed clean {tmp_path}" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cmoe"):
        clean_run_folder(tmp_path)  # what the training run's rank 0 does when it starts
    assert not junk.exists() and junk.name in caplog.text
    assert find_latest(tmp_path).name == "step_00000003" and _resume_step(tmp_path) == 3


LEGACY_LEFTOVERS = [".step_00000004.tmp-999999999", ".step_00000002.old-999999999", ".latest.tmp-999999999-x1y2"]


@pytest.mark.parametrize("leftover", LEGACY_LEFTOVERS)
def test_leftovers_that_name_no_host_are_kept_and_reported_with_the_command(tmp_path, caplog, leftover) -> None:
    _run(tmp_path)
    junk = _make(tmp_path, leftover)
    with caplog.at_level(logging.WARNING, logger="cmoe"):
        clean_run_folder(tmp_path)
    assert junk.exists(), "a temporary whose writer cannot be checked was removed"
    assert leftover in caplog.text and f"cmoe unimed clean {tmp_path} --older-than" in caplog.text


def test_a_live_writers_temporary_is_left_alone(tmp_path) -> None:
    _run(tmp_path)
    parent = dataclasses.replace(current_writer(), pid=os.getppid(), start=process_start(os.getppid()))
    live = tmp_path / leftover_name("step_00000004", TMP, parent)
    live.mkdir()
    find_latest(tmp_path)
    clean_run_folder(tmp_path)
    assert live.is_dir()


def test_rewriting_an_existing_step_replaces_it_whole(tmp_path) -> None:
    _run(tmp_path)
    weights = _run(tmp_path, steps=(3,))
    parts = read_checkpoint(tmp_path / "step_00000003")
    assert all(torch.equal(parts["trainable"][f"head.{k}"], v) for k, v in weights[3].items())
