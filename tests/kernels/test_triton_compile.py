"""Every Triton kernel variant compiles for Hopper (sm_90) on this CPU-only machine, ahead of time with triton's
own compiler and ptxas (`cmoe.benchmarks.compile_check`), and the compiled code uses what the design relies on:
wgmma tensor-core MMAs, pipelined (cp.async) or TMA loads, and fits an H100/H200's shared memory. A variant that
has never run on a GPU (persistent, TMA weights, staged rows) cannot reach a GPU session unable to compile."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HOPPER_SHARED_BYTES = 227 * 1024  # the most shared memory one block may use on sm_90

pytestmark = [pytest.mark.skipif(importlib.util.find_spec("triton.backends.nvidia") is None,
                                 reason="this triton build has no NVIDIA backend to compile with"),
              pytest.mark.smoke]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("compile") / "sm90.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_DEFAULT_FP_FUSION="1", TRITON_CACHE_DIR=str(out.parent / "cache"))
    done = subprocess.run([sys.executable, "-m", "cmoe.benchmarks.compile_check", "--arch", "90", "--json", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return {entry["name"]: entry for entry in json.loads(out.read_text())}


@pytest.mark.slow
def test_every_variant_compiles_and_uses_hopper_tensor_cores(compiled: dict[str, dict]) -> None:
    assert len(compiled) == 9
    for name, entry in compiled.items():
        assert entry["shared_bytes"] <= HOPPER_SHARED_BYTES, name
        if not name.startswith("alignment"):
            assert entry["counts"]["wgmma"] > 0 and entry["counts"]["mma_sync"] == 0, name


@pytest.mark.slow
def test_loads_are_pipelined_or_through_tma_as_each_variant_says(compiled: dict[str, dict]) -> None:
    for name, entry in compiled.items():
        if name.startswith("alignment"):
            continue
        assert entry["counts"]["cp_async"] > 0, f"{name}: the pointer loads are not software-pipelined"
        assert (entry["counts"]["tma_load"] > 0) == ("TMA" in name), name
        assert (entry["counts"]["atomic_add"] > 0) == ("atomic" in name), name


def test_the_check_refuses_interpreted_kernels() -> None:
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-m", "cmoe.benchmarks.compile_check"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "unset TRITON_INTERPRET" in done.stderr
