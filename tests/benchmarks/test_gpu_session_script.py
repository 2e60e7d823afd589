"""`benchmarks/gpu_session.sh all` on CPU (GPU_SESSION_DRY=1): the one-call GPU script runs every phase, writes
every log to one folder and records each phase's status, so a short GPU session is not spent debugging it."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def write_wheel(folder: Path, name: str = "cmoe_peer_probe") -> Path:
    """A minimal pure-Python wheel (one module), as `benchmarks/peer_wheels.sh` would leave a peer's."""
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / f"{name}-0.1-py3-none-any.whl"
    info = f"{name}-0.1.dist-info"
    files = {f"{name}/__init__.py": "VALUE = 1\n",
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, text in files.items():
            archive.writestr(path, text)
        archive.writestr(f"{info}/RECORD", "".join(f"{path},,\n" for path in files) + f"{info}/RECORD,,\n")
    return wheel


@pytest.mark.slow
def test_dry_run_of_the_whole_gpu_session(tmp_path: Path) -> None:
    out = tmp_path / "gpu-out"
    wheel = write_wheel(tmp_path / "wheels")
    env = dict(os.environ, GPU_SESSION_DRY="1", PYTHON=sys.executable, BENCH_CASES="linear",
               TESTS_S="300", PAPER_S="300", SWEEP_S="120", BENCH_S="300", PEER_WHEELS=str(wheel.parent),
               TMPDIR=str(tmp_path))
    done = subprocess.run(["bash", "benchmarks/gpu_session.sh", "all", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    phases = [line.split() for line in (out / "phases.txt").read_text().splitlines()]
    assert [(name, status) for name, status, _ in phases] == [("tests", "0"), ("paper", "0"), ("bench", "0"),
                                                              ("sweep", "0")]
    device = (out / "device.txt").read_text()
    assert device.startswith("dry run on CPU")
    assert f"peers: installed from {wheel.parent}: {wheel.name}" in device  # carried wheels, installed once
    assert (tmp_path / "cmoe-peers" / "cmoe_peer_probe" / "__init__.py").is_file()
    assert len(list(out.iterdir())) <= 8  # the most files one device call brings back
    paper = (out / "paper.log").read_text()
    assert "1 steps of batch 4 (fp32)" in paper and '"step_s_median"' in paper  # the result JSON is in the log
    tests_log = (out / "tests.log").read_text()
    for module in ("kernels/test_triton_gpu.py", "kernels/test_dispatch_grouped_mm.py", "core/test_dispatch_auto.py"):
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


def test_peer_wheels_are_optional_and_a_broken_one_does_not_stop_the_session(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "nothing-0.1-py3-none-any.whl").write_text("not a zip")
    for folder, expected in ((tmp_path / "empty", "peers: as installed (no wheels in"),
                             (broken, "peers: installing the wheels in")):
        env = dict(os.environ, GPU_SESSION_DRY="1", PYTHON=sys.executable, PEER_WHEELS=str(folder),
                   TMPDIR=str(tmp_path))
        env.pop("CMOE_PEERS", None)
        done = subprocess.run(["bash", "benchmarks/gpu_session.sh", "nope", str(tmp_path / "out")], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 2, done.stderr  # the unknown phase, after the device line was written
        assert expected in (tmp_path / "out" / "device.txt").read_text()
