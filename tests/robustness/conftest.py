"""The robustness audit's summary line: how many bad inputs and faults were tried, and with what outcome."""

from __future__ import annotations

import pytest


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    def ours(kind: str) -> int:
        return sum(1 for report in terminalreporter.stats.get(kind, [])
                   if "tests/robustness/" in getattr(report, "nodeid", "") and report.when in ("call", "setup"))

    passed, failed, skipped = ours("passed"), ours("failed") + ours("error"), ours("skipped")
    if passed or failed:
        terminalreporter.write_line(f"robustness audit: {passed + failed} cases tried, {passed} with the expected "
                                    f"outcome, {failed} not; {skipped} left to --robustness-full")
