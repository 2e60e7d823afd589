"""Audit: kill-and-resume of real training runs. A run killed at any point (SIGKILL by its own pid inside a
checkpoint write, between the rename and the ``latest`` update, mid-step; SIGINT; a full disk), or whose run
directory was damaged afterwards, must resume to the same weights and metrics, bit for bit, as a run never
interrupted, and leave no temporaries behind. Full audit only (``--robustness-full``): each case trains."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from robustness_audit import flip_bit

from cmoe.reference_models.unimed.model.checkpoint import read_checkpoint
from cmoe.reference_models.unimed.training.train import Trainer

pytestmark = [pytest.mark.robustness_full, pytest.mark.slow]
TESTS = Path(__file__).resolve().parents[1] / "support"
RUN = {"train__steps": 6, "train__save_every": 2, "train__log_every": 1, "train__batch_size": 2,
       "data__synthetic": {"num_images": 24, "qa_questions": 8, "eval_images": 4}}


def _config(out: Path):
    sys.path.insert(0, str(TESTS))
    from unimed_tiny import test_config

    return test_config(out, **RUN)


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[dict[str, torch.Tensor], list[dict]]:
    torch.set_num_threads(2)
    out = tmp_path_factory.mktemp("reference")
    result = Trainer(_config(out)).train()
    return read_checkpoint(result.checkpoint)["trainable"], _metrics(out)


def _resume_and_compare(out: Path, reference) -> None:
    torch.set_num_threads(2)
    result = Trainer(_config(out)).train()
    weights, metrics = reference
    resumed = read_checkpoint(result.checkpoint)["trainable"]
    assert resumed.keys() == weights.keys() and all(torch.equal(resumed[k], weights[k]) for k in weights), \
        "resumed weights differ from the uninterrupted run"
    got = _metrics(out)
    assert [r["step"] for r in got] == [r["step"] for r in metrics]
    assert [r["loss"] for r in got] == [r["loss"] for r in metrics], "metrics lost or rewritten"
    leftovers = [p.name for p in out.iterdir() if p.name.startswith(".")]
    assert not leftovers, f"temporaries left behind: {leftovers}"


CHILD = textwrap.dedent("""
    import os, signal, sys
    import torch
    torch.set_num_threads(2)
    sys.path.insert(0, sys.argv[4])
    from test_audit_training import _config
    import cmoe.checkpointing as checkpointing
    import safetensors.torch
    import cmoe.reference_models.unimed.model.checkpoint as checkpoint
    from cmoe.reference_models.unimed.training.train import Trainer
    from pathlib import Path
    stage, out, nth = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    seen = {"stage": 0, "write": 0}
    def kill(name):
        if name == stage:
            seen["stage"] += 1
            if seen["stage"] == nth:
                os.kill(os.getpid(), signal.SIGKILL)
    checkpointing._stage = kill
    real = checkpoint.save_file
    def faulty(tensors, path, metadata=None):
        if path.endswith("optimizer.safetensors"):
            seen["write"] += 1
            if seen["write"] == nth and stage == "mid-write":
                real(tensors, path, metadata=metadata)
                data = open(path, "rb").read()
                open(path, "wb").write(data[: len(data) // 2])
                os.kill(os.getpid(), signal.SIGKILL)
            if seen["write"] == nth and stage == "disk-full":
                raise OSError(28, "No space left on device")
        real(tensors, path, metadata=metadata)
    checkpoint.save_file = faulty
    Trainer(_config(out)).train()
""")

STAGES = [("files-written", 2), ("renamed", 2), ("checkpoint-before-latest", 2), ("mid-write", 2), ("disk-full", 2)]


@pytest.mark.parametrize("stage,nth", STAGES, ids=[f"{s}-save{n}" for s, n in STAGES])
def test_a_run_killed_inside_a_checkpoint_write_resumes_bit_exactly(tmp_path, reference, stage: str, nth: int):
    out = tmp_path / "run"
    child = subprocess.run([sys.executable, "-c", CHILD, stage, str(out), str(nth), str(Path(__file__).parent)],
                           capture_output=True, text=True, timeout=600)
    expected = 1 if stage == "disk-full" else -signal.SIGKILL
    assert child.returncode == expected, child.stderr[-3000:]
    _resume_and_compare(out, reference)


MARKED = [(signal.SIGKILL, 1), (signal.SIGKILL, 5), (signal.SIGINT, 3)]


@pytest.mark.parametrize("sig,after_step", MARKED, ids=[f"{s.name}-after-step{n}" for s, n in MARKED])
def test_a_run_killed_by_pid_mid_training_resumes_bit_exactly(tmp_path, reference, sig, after_step: int) -> None:
    out = tmp_path / "run"
    child = subprocess.Popen([sys.executable, "-c", CHILD, "none", str(out), "0", str(Path(__file__).parent)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    while not (metrics.is_file() and f'"step": {after_step},' in metrics.read_text()):
        assert child.poll() is None, child.stderr.read()[-3000:]
        time.sleep(0.05)
    os.kill(child.pid, sig)
    child.communicate(timeout=600)
    assert child.returncode != 0
    _resume_and_compare(out, reference)


def _partial(out: Path) -> None:
    torch.set_num_threads(2)
    Trainer(_config(out)).train(steps=4)


DAMAGE = {
    "latest deleted": lambda out: (out / "latest").unlink(),
    "latest garbage": lambda out: (out / "latest").write_bytes(b"\x00\xffgarbage"),
    "latest dangling": lambda out: (out / "latest").write_text("step_00000099\n"),
    "newest weights bit-flipped": lambda out: flip_bit(out / "step_00000004" / "trainable.safetensors", -5),
    "newest optimizer deleted": lambda out: (out / "step_00000004" / "optimizer.safetensors").unlink(),
    "metrics line cut short": lambda out: open(out / "metrics.jsonl", "a").write('{"step": 5, "lo'),
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_a_damaged_run_directory_resumes_bit_exactly(tmp_path, reference, kind: str) -> None:
    out = tmp_path / "run"
    _partial(out)
    DAMAGE[kind](out)
    _resume_and_compare(out, reference)
