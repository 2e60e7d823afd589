"""`benchmarks/gpu_session.sh all` on CPU (GPU_SESSION_DRY=1): the one-call GPU script runs every phase, writes
every log to one folder and records each phase's status, so a short GPU session is not spent debugging it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_dry_run_of_the_whole_gpu_session(tmp_path: Path) -> None:
    out = tmp_path / "gpu-out"
    env = dict(os.environ, GPU_SESSION_DRY="1", PYTHON=sys.executable, BENCH_CASES="linear",
               TESTS_S="300", PAPER_S="300", SWEEP_S="120", BENCH_S="300")
    done = subprocess.run(["bash", "benchmarks/gpu_session.sh", "all", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    phases = [line.split() for line in (out / "phases.txt").read_text().splitlines()]
    assert [(name, status) for name, status, _ in phases] == [("tests", "0"), ("paper", "0"), ("bench", "0"),
                                                              ("sweep", "0")]
    assert (out / "device.txt").read_text().startswith("dry run on CPU")
    assert len(list(out.iterdir())) <= 8  # the most files one device call brings back
    paper = (out / "paper.log").read_text()
    assert "1 steps of batch 4 (fp32)" in paper and '"step_s_median"' in paper  # the result JSON is in the log
    tests_log = (out / "tests.log").read_text()
    for module in ("test_triton_gpu.py", "test_dispatch_grouped_mm.py", "test_dispatch_auto.py"):
        assert f"tests/{module}::" in tests_log  # collected for the GPU run
    assert "needs CUDA (as expected)" in (out / "sweep.log").read_text()
    report = (out / "RESULTS.md").read_text()
    assert "### `linear-T64-in32-out48-E4-k2`" in report and "### `mlp-T64" not in report
    assert "| `grouped_mm` |" in report and "`auto` (forward) picked " in report


def test_unknown_phase_is_refused(tmp_path: Path) -> None:
    env = dict(os.environ, GPU_SESSION_DRY="1", PYTHON=sys.executable)
    done = subprocess.run(["bash", "benchmarks/gpu_session.sh", "nope", str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "unknown phase nope" in done.stderr
