"""Two processes through torchrun (gloo on CPU), DDP and FSDP: both ranks end with identical (full) weights while
each rank reads its own batches, rank 0 writes the checkpoint in the one format, and the live tug-of-war
analysis runs under both; an FSDP trainer resumes the checkpoint on every rank."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_process_torchrun_ranks_agree(tmp_path: Path, mode: str) -> None:
    worker = Path(__file__).resolve().parents[2] / "support" / "unimed_ddp_worker.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CMOE_DISABLE_PLUGINS": os.environ.get("CMOE_DISABLE_PLUGINS", "")}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(worker), str(tmp_path), mode], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert [(tmp_path / f"world_rank{r}.txt").read_text() for r in (0, 1)] == ["2", "2"]
    a, b = (load_file(str(tmp_path / f"weights_rank{r}.safetensors")) for r in (0, 1))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    first = [json.loads((tmp_path / f"batch_rank{r}.json").read_text()) for r in (0, 1)]
    assert first[0] != first[1]
    checkpoint = tmp_path / "run" / "step_00000004"
    saved = load_file(str(checkpoint / "trainable.safetensors"))
    assert all(torch.equal(saved[k], a[k]) for k in a)
    assert json.loads((checkpoint / "state.json").read_text())["world_size"] == 2
    report = json.loads((tmp_path / "run" / "tug_of_war" / "tug_of_war.json").read_text())
    assert [s["step"] for s in report["steps"]] == [0, 2, 4]
    last = report["steps"][-1]
    assert last["parameters"]["router"]["update_norm"] > 0
    assert all(abs(last["gradients"]["all"]["cosine"][i][i] - 1) < 1e-9 for i in range(5))
    if mode == "fsdp":
        for r in (0, 1):
            resumed = load_file(str(tmp_path / f"resumed_rank{r}.safetensors"))
            assert resumed.keys() == a.keys() and all(torch.equal(resumed[k], a[k]) for k in a)
            state = json.loads((tmp_path / f"resumed_rank{r}.json").read_text())
            assert state["step"] == 4 and state["fingerprint"] == state["trained_fingerprint"]


@pytest.mark.smoke
@pytest.mark.slow
def test_torchrun_cli_train_checkpoints_and_exits_cleanly(tmp_path: Path) -> None:
    """The documented command, ``torchrun ... -m cmoe unimed train``: rank 0 reports and writes the checkpoint,
    and both ranks leave the process group (`Trainer.close`) so neither aborts nor hangs at exit."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CMOE_DISABLE_PLUGINS": os.environ.get("CMOE_DISABLE_PLUGINS", "")}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "-m", "cmoe", "unimed", "train", "--config", "tiny", "--output-dir", str(tmp_path),
                             "--set", "train.steps=2", "--set", "train.save_every=2", "--set", "train.progress=false"],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    reports = [line for line in result.stdout.splitlines() if line.startswith("trained to step")]
    assert len(reports) == 1 and reports[0].endswith(f"checkpoint {tmp_path / 'step_00000002'}")
    assert json.loads((tmp_path / "step_00000002" / "state.json").read_text())["world_size"] == 2
    assert (tmp_path / "latest").read_text().strip() == "step_00000002"
