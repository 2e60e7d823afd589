"""The plugin contract: pluggy hook specifications of the ``cmoe`` project.

A plugin is a module (or object) with functions marked ``@cmoe.hookimpl`` named like the specs below. Each
hook receives a ``register(name, item)`` callable; every call adds one named item to the matching registry.
Installed distributions expose plugins through entry points in the group ``cmoe``::

    [project.entry-points.cmoe]
    my_router = "my_package.cmoe_plugin"

The core's own routers, experts and backends are registered through these same hooks.
"""

from __future__ import annotations

from collections.abc import Callable

import pluggy

PROJECT = "cmoe"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

Register = Callable[[str, object], object]


@hookspec
def cmoe_register_routers(register: Register) -> None:
    """Register router classes: ``register("name", RouterClass)``.

    A router class is an ``nn.Module`` built as ``cls(in_features, num_experts, *, top_k, num_tasks, ...)``
    (see `cmoe.routers.Router`) whose ``forward(x [B, N, D], task_ids)`` returns a `cmoe.RoutingResult`.
    """


@hookspec
def cmoe_register_experts(register: Register) -> None:
    """Register expert classes: ``register("name", ExpertsClass)``, subclasses of `cmoe.StackedExperts`
    built as ``cls(num_experts, in_features, out_features, *, hidden_features, bias, activation)``."""


@hookspec
def cmoe_register_backends(register: Register) -> None:
    """Register dispatch backends: ``register("name", cmoe.Backend(...))``."""


@hookspec
def cmoe_register_vision_encoders(register: Register) -> None:
    """Register vision-encoder builders: ``register("name", build)``; ``build(**options)`` returns an
    ``nn.Module`` mapping ``pixel_values [B, 3, H, W]`` to patch features ``[B, N, D]`` with ``out_features``."""


@hookspec
def cmoe_register_llms(register: Register) -> None:
    """Register LLM builders: ``register("name", build)``; ``build(**options)`` returns a causal LM that
    accepts ``inputs_embeds``."""


@hookspec
def cmoe_register_attachers(register: Register) -> None:
    """Register attachers: ``register("name", attacher)``; an attacher knows where one MLLM family keeps its
    connector (``attacher.matches(model)``, ``attacher.attach(model, connector)``, ``attacher.detach(model)``;
    optionally ``upcycle_source(model)`` for upcycled experts and ``fallback = True`` to be asked last)."""


@hookspec
def cmoe_register_commands(register: Register) -> None:
    """Register ``cmoe`` subcommands: ``register("name", command)``; ``command(argv: list[str]) -> int`` parses
    its own arguments (``cmoe name --help``) and its docstring's first line is the help shown by ``cmoe --help``.
    Recipes add their command line this way, so the core CLI imports none of them."""
