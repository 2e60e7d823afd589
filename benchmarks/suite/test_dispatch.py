"""pytest-benchmark suite: every implementation × case × {forward, forward_backward}.

Run with ``pytest benchmarks/suite --benchmark-only`` (the project's normal ``pytest`` only collects ``tests/``).
Results are grouped per case and mode. By default only the E=8, k=2 cases run, keeping a CPU run under
~5 minutes; ``CMOE_BENCH_CASES=all`` runs the whole grid and any other value keeps the cases whose name
contains it. ``CMOE_BENCH_ROUNDS`` sets the timed rounds (default 3, after one warm-up round).
For the one-process Markdown report with roofline ratios use ``python -m cmoe.benchmarks.run``.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import torch

from cmoe.benchmarks.cases import MODES, ROOFLINE, Case, Workload, build_workload, default_cases, make_callable

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ROUNDS = int(os.environ.get("CMOE_BENCH_ROUNDS", "3"))


def selected_cases() -> list[Case]:
    """The cases chosen by ``CMOE_BENCH_CASES`` (default: the E=8, k=2 headline cases)."""
    wanted = os.environ.get("CMOE_BENCH_CASES", "")
    cases = default_cases(DEVICE)
    if wanted == "all":
        return cases
    if wanted:
        return [case for case in cases if wanted in case.name]
    return [case for case in cases if case.num_experts == 8 and case.top_k == 2]


PARAMS = [pytest.param(case, name, mode, id=f"{case.name}-{name}-{mode}")
          for case in selected_cases() for name in case.implementations for mode in MODES]
_workloads: dict[Case, Workload] = {}


def workload_for(case: Case) -> Workload:
    """The case's workload, built once; only the latest case's is kept, bounding memory."""
    if case not in _workloads:
        _workloads.clear()
        _workloads[case] = build_workload(case, DEVICE)
    return _workloads[case]


@pytest.mark.parametrize(("case", "name", "mode"), PARAMS)
def test_dispatch(benchmark, case: Case, name: str, mode: str) -> None:
    """Time implementation `name` on `case` in `mode`."""
    workload = workload_for(case)
    if name in workload.skipped:
        pytest.skip(workload.skipped[name])
    benchmark.group = f"{case.name} {mode}"
    benchmark.extra_info["routed_gflop"] = case.flops / 1e9
    fn = make_callable(workload, name, mode)
    if DEVICE.type == "cuda":
        fn = _synchronized(fn)
    out = benchmark.pedantic(fn, rounds=ROUNDS, warmup_rounds=1)
    assert out.shape == (case.tokens * case.top_k if name == ROOFLINE else case.tokens,
                         case.out_features)


def _synchronized(fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """`fn` followed by a CUDA synchronize, so wall-clock rounds include the kernels."""
    def run() -> torch.Tensor:
        out = fn()
        torch.cuda.synchronize()
        return out
    return run
