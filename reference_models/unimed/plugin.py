"""Registers ``cmoe unimed`` with the ``cmoe`` command line (entry point ``unimed_recipe`` in group ``cmoe``)."""

from __future__ import annotations

from cmoe.extras import require
from cmoe.hookspecs import Register, hookimpl


def unimed(argv: list[str]) -> int:
    """The Uni-Med recipe: train, eval, analyze, experiment, data-stats, demo, pretrain, convert-original, clean."""
    require("unimed", "cmoe unimed")
    from cmoe.reference_models.unimed.cli import main

    return main(argv)


@hookimpl
def cmoe_register_commands(register: Register) -> None:
    register("unimed", unimed)
