"""Audit: one folder, several hosts and processes (issue 30). A temporary names its writer fully (host, boot, PID
namespace, PID, start time); a writer is judged dead only where that can be proven (a reused PID is not the
writer; another host's or boot's writer is unknown here, kept and reported with the command that removes it);
readers change nothing; the owner puts back and removes; every atomic write in the project goes through one
helper. The same with real hosts (PID and UTS namespaces, torchrun across them): tests/unimed/training/test_unimed_multinode.py."""

from __future__ import annotations

import ast
import dataclasses
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from robustness_audit import assert_clear, exited_writer, leftover_name, snapshot
from test_audit_checkpoints import _run

from cmoe import CMoEConfig, CMoEConnector, CMoEError, load_connector
from cmoe.checkpointing import atomic_directory, verify_directory
from cmoe.cli import main
from cmoe.config import read_config_json
from cmoe.io import save_tensors
from cmoe.leftovers import (
    ALIVE,
    DEAD,
    OLD,
    TMP,
    UNKNOWN,
    current_writer,
    parse_leftover,
    process_start,
    temporary_path,
    writer_status,
)
from cmoe.reference_models.unimed.model.checkpoint import clean_run_folder, find_latest, read_checkpoint
from cmoe.reference_models.unimed.training.elastic import restart_hazard
from cmoe.reference_models.unimed.training.run_folder import unshared_message

ROOT = Path(__file__).resolve().parents[2]


def test_a_temporary_names_its_writer_fully(tmp_path) -> None:
    leftover = parse_leftover(temporary_path(tmp_path / "step_00000004"))
    me = current_writer()
    assert leftover.target == tmp_path / "step_00000004" and leftover.kind == TMP and leftover.writer == me
    assert me.pid == os.getpid() and me.start == process_start(os.getpid()) > 0 and me.boot and me.pidns
    assert leftover.status() == ALIVE


def test_a_reused_pid_is_not_taken_for_the_writer() -> None:
    child = subprocess.Popen(["sleep", "60"])
    try:
        start = process_start(child.pid)
        writer = dataclasses.replace(current_writer(), pid=child.pid, start=start)
        assert writer_status(writer) == ALIVE
        assert writer_status(dataclasses.replace(writer, start=start - 1)) == DEAD, \
            "a process that started after the writer, under its PID, kept the writer's temporary alive"
    finally:
        child.kill()
        child.wait()
    assert writer_status(writer) == DEAD


ELSEWHERE = {"another boot": {"boot": "0" * 12}, "another PID namespace": {"pidns": "1"},
             "another host": {"host": "nodeB", "boot": "f" * 12, "pidns": "4026531836"}}


@pytest.mark.parametrize("where", list(ELSEWHERE))
def test_a_writer_this_host_cannot_check_is_kept_and_reported_until_the_user_says(tmp_path, caplog, capsys, where):
    _run(tmp_path)
    writer = dataclasses.replace(exited_writer(), **ELSEWHERE[where])
    junk = tmp_path / leftover_name("step_00000004", TMP, writer)
    junk.mkdir()
    assert writer_status(writer) == UNKNOWN
    with caplog.at_level(logging.WARNING, logger="cmoe"):
        clean_run_folder(tmp_path)
    assert junk.exists(), "the owner removed a temporary it cannot prove dead"
    assert f"pid {writer.pid} on {writer.host}" in caplog.text and "--older-than" in caplog.text
    assert main(["clean", str(tmp_path), "--older-than", "1h"]) == 0 and junk.exists(), "removed a fresh one"
    assert main(["clean", str(tmp_path), "--older-than", "0s", "--dry-run"]) == 0 and junk.exists()
    os.utime(junk, (0, 0))
    assert main(["clean", str(tmp_path), "--older-than", "1h"]) == 0
    assert not junk.exists() and find_latest(tmp_path).name == "step_00000003"
    assert "untouched for" in capsys.readouterr().out


def test_the_owner_puts_back_a_checkpoint_a_dead_writer_moved_aside(tmp_path, caplog) -> None:
    _run(tmp_path)
    dead = exited_writer()
    aside = tmp_path / leftover_name("step_00000003", OLD, dead)
    os.replace(tmp_path / "step_00000003", aside)
    (tmp_path / leftover_name("step_00000003", TMP, dead)).mkdir()
    with caplog.at_level(logging.WARNING, logger="cmoe"):
        clean_run_folder(tmp_path)
    assert f"restore {tmp_path / 'step_00000003'}" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    read_checkpoint(tmp_path / "step_00000003")


def _folder_of_leftovers(tmp_path: Path) -> tuple[Path, Path]:
    """A run folder and a connector folder holding every kind of leftover: a dead writer's (here), a live one's
    (this process), one of another host, one that names no host; and a connector moved aside."""
    run = tmp_path / "run"
    _run(run)
    torch.manual_seed(0)
    connectors = tmp_path / "connectors"
    for name in ("kept", "aside"):
        CMoEConnector(CMoEConfig(in_features=4, out_features=4, num_experts=2)).save_pretrained(connectors / name)
    dead, me = exited_writer(), current_writer()
    other = dataclasses.replace(dead, host="nodeB", boot="e" * 12)
    for folder, target in ((run, "step_00000004"), (connectors, "kept")):
        for writer in (dead, me, other):
            (folder / leftover_name(target, TMP, writer)).mkdir()
        (folder / f".{target}.tmp-999999999").mkdir()
    (run / leftover_name("latest", TMP, dead)).write_text("step_00000002\n")
    os.replace(connectors / "aside", connectors / leftover_name("aside", OLD, dead))
    return run, connectors


READERS = {
    "find_latest": lambda run, connectors: find_latest(run),
    "read_checkpoint": lambda run, connectors: read_checkpoint(find_latest(run)),
    "verify_directory": lambda run, connectors: verify_directory(connectors / "kept"),
    "read_config_json": lambda run, connectors: read_config_json(connectors / "kept"),
    "load_connector": lambda run, connectors: load_connector(connectors / "kept"),
    "load a connector moved aside": lambda run, connectors: load_connector(connectors / "aside"),
    "verify a connector moved aside": lambda run, connectors: verify_directory(connectors / "aside"),
}


@pytest.mark.parametrize("reader", list(READERS))
def test_readers_change_nothing(tmp_path, caplog, reader: str) -> None:
    run, connectors = _folder_of_leftovers(tmp_path)
    before = snapshot(tmp_path)
    with caplog.at_level(logging.WARNING, logger="cmoe"):
        try:
            READERS[reader](run, connectors)
        except CMoEError as error:
            assert "aside" in reader, f"{reader} failed: {error}"
            assert_clear(error, ".aside.old~", f"cmoe clean {connectors}")
        else:
            assert "aside" not in reader, "a connector moved aside was loaded as if it were in place"
    assert snapshot(tmp_path) == before, f"{reader} changed what it read"
    if reader == "find_latest":
        assert f"skipped .step_00000004.tmp~{current_writer().host}" in caplog.text
        assert "skipped .step_00000004.tmp-999999999" in caplog.text


def test_a_reader_names_each_leftover_once_per_process(tmp_path, caplog) -> None:
    run, _ = _folder_of_leftovers(tmp_path)
    with caplog.at_level(logging.WARNING, logger="cmoe"):
        for _ in range(3):
            find_latest(run)
    assert caplog.text.count("skipped .step_00000004.tmp-999999999") == 1


def test_a_failed_rename_into_place_puts_the_old_directory_back(tmp_path, monkeypatch) -> None:
    target = tmp_path / "d"
    with atomic_directory(target) as tmp:
        (tmp / "a.txt").write_text("one")
    real = os.replace

    def failing(source, destination):
        if ".d.tmp~" in str(source):
            raise OSError(5, "I/O error")
        real(source, destination)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError):
        with atomic_directory(target) as tmp:
            (tmp / "a.txt").write_text("two")
    assert (target / "a.txt").read_text() == "one" and sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_written_files_get_the_permissions_the_umask_allows(tmp_path) -> None:
    """An evaluation job of another user on a shared folder reads them (safetensors alone writes 0600)."""
    mask = os.umask(0o022)
    try:
        save_tensors(tmp_path / "w.safetensors", {"w": torch.zeros(2)})
        _run(tmp_path / "run")
    finally:
        os.umask(mask)
    files = [tmp_path / "w.safetensors", *(tmp_path / "run").rglob("*.safetensors"), tmp_path / "run" / "latest"]
    assert {oct(p.stat().st_mode & 0o777) for p in files} == {"0o644"}


RENAMES = {"os.replace", "os.rename", "os.renames", "shutil.move", "tempfile.mkstemp", "tempfile.NamedTemporaryFile"}
OWNERS = {"cmoe/checkpointing.py", "cmoe/leftovers.py"}


def test_every_atomic_write_goes_through_one_helper() -> None:
    """No module renames files or makes its own temporaries but `cmoe.checkpointing` (the writer) and
    `cmoe.leftovers` (which puts back what a dead writer moved aside)."""
    found = []
    for folder in ("cmoe", "reference_models", "plugins", "kernels", "benchmarks"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                        isinstance(node.func.value, ast.Name) and f"{node.func.value.id}.{node.func.attr}" in RENAMES:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert found and all(where.split(":")[0] in OWNERS for where in found), found


@pytest.mark.parametrize("argv", [["clean", "{tmp}", "--older-than", "soon"], ["clean", "{tmp}/missing"]])
def test_cmoe_clean_refuses_bad_input_with_one_line(tmp_path, argv) -> None:
    result = subprocess.run([sys.executable, "-m", "cmoe", *[a.format(tmp=tmp_path) for a in argv]],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert ("--older-than" if "soon" in argv else "missing") in result.stderr


def test_a_rank_that_does_not_see_the_run_folder_is_named_with_the_fix() -> None:
    message = unshared_message(Path("/runs/x"), [(0, "nodeA", True), (1, "nodeB", False), (2, "nodeC", True)])
    assert "rank 1 on nodeB" in message and "rank 0 (on nodeA)" in message and "shared folder" in message
    assert unshared_message(Path("/runs/x"), [(0, "nodeA", True), (1, "nodeB", True)]) is None


def test_elastic_restarts_across_nodes_warn_about_torchruns_shared_store() -> None:
    env = {"GROUP_WORLD_SIZE": "2", "TORCHELASTIC_MAX_RESTARTS": "1", "TORCHELASTIC_USE_AGENT_STORE": "True"}
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in restart_hazard(env)
    for change in ({"GROUP_WORLD_SIZE": "1"}, {"TORCHELASTIC_MAX_RESTARTS": "0"},
                   {"TORCHELASTIC_USE_AGENT_STORE": "False"}):
        assert restart_hazard({**env, **change}) is None
