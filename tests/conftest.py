"""Shared test set-up: deterministic seeds, few threads (CI has 2 cores), helpers."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

# The shared helpers and subprocess workers (tests/support/) import by bare name from every test folder.
sys.path.insert(0, str(Path(__file__).parent / "support"))

# Without CUDA the triton kernels can only run in triton's CPU interpreter, which must be chosen before they
# are first compiled: set it for the whole test session (backend="auto" still never picks triton on CPU).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(2)


@pytest.fixture
def fresh_selector(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The measuring ``auto`` without the environment's mode or cache file, and a fresh one afterwards."""
    from cmoe import auto  # imported late: TRITON_INTERPRET is set above, before any kernel is compiled

    monkeypatch.delenv(auto.ENV_MODE, raising=False)
    monkeypatch.delenv(auto.ENV_CACHE, raising=False)
    yield
    auto.configure_auto()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--robustness-full", action="store_true", default=False,
                     help="run the whole robustness audit (tests/robustness): kill-and-resume of real training "
                          "runs and every fault case; without it only the fast subset runs")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--robustness-full"):
        return
    skip = pytest.mark.skip(reason="full robustness audit only: pytest tests/robustness --robustness-full")
    for item in items:
        if "robustness_full" in item.keywords:
            item.add_marker(skip)
