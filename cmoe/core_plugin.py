"""The core's own routers, experts and dispatch backends, registered through the plugin hooks like any
other plugin's (first, by `cmoe.plugin_manager`, before any entry point). The plugin packages register theirs
in their own ``plugin`` modules: `cmoe.plugins.plugin`, `cmoe.kernels.plugin`, `cmoe.benchmarks.plugin` (the
``cmoe bench`` command)."""

from __future__ import annotations

from cmoe.dispatch import Backend, dense_backend, loop_backend, sorted_backend
from cmoe.experts import LinearExperts, MLPExperts
from cmoe.hookspecs import Register, hookimpl
from cmoe.routers import (
    ConstantRouter,
    HardTaskRouter,
    SoftRouter,
    TaskRouter,
    TaskTokenRouter,
    TokenTopKRouter,
)


@hookimpl
def cmoe_register_routers(register: Register) -> None:
    for cls in (TokenTopKRouter, SoftRouter, TaskRouter, TaskTokenRouter, HardTaskRouter, ConstantRouter):
        register(cls.name, cls)


@hookimpl
def cmoe_register_experts(register: Register) -> None:
    register("linear", LinearExperts)
    register("mlp", MLPExperts)


@hookimpl
def cmoe_register_backends(register: Register) -> None:
    register("loop", Backend("loop", loop_backend, description="reference per-expert loop",
                             auto_candidate=lambda device: False))
    register("sorted", Backend("sorted", sorted_backend, description="expert-sorted contiguous matmuls"))
    register("dense", Backend("dense", dense_backend, description="every expert on every token, one wide GEMM"))

