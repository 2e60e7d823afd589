"""Registers the ``cmoe bench`` command (entry point ``benchmarks`` in group ``cmoe`` of the ``cmoe``
distribution), so the core's command line imports no benchmark code."""

from __future__ import annotations

from cmoe.benchmarks.bench_command import bench_command
from cmoe.hookspecs import Register, hookimpl


@hookimpl
def cmoe_register_commands(register: Register) -> None:
    register("bench", bench_command)
