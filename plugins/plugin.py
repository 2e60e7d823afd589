"""The hook implementations of `cmoe.plugins`: its vision encoders, LLM builder and attachers, registered through
the same hooks as any third-party plugin (entry point ``builtin_plugins`` in group ``cmoe`` of the ``cmoe``
distribution). The core's own routers, experts and backends register in `cmoe.core_plugin`.

Builders are registered as thin lazy wrappers, so loading plugins imports neither transformers nor the
encoder code until a builder is called.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from cmoe.hookspecs import Register, hookimpl


def lazy_builder(module: str, function: str) -> Callable[..., Any]:
    """A builder that imports ``module.function`` on first call and forwards its keyword options."""
    def build(**options: Any) -> Any:
        return getattr(importlib.import_module(module), function)(**options)

    build.__name__ = function
    build.__qualname__ = function
    build.__doc__ = f"Build with `{module}.{function}` (imported on first use); see its docstring for options."
    return build


@hookimpl
def cmoe_register_vision_encoders(register: Register) -> None:
    register("hf_clip", lazy_builder("cmoe.plugins.vision_encoders", "build_hf_clip"))
    register("hf_siglip", lazy_builder("cmoe.plugins.vision_encoders", "build_hf_siglip"))
    register("eva_clip_g", lazy_builder("cmoe.plugins.eva_clip", "build_eva_clip_g"))


@hookimpl
def cmoe_register_llms(register: Register) -> None:
    register("hf_causal_lm", lazy_builder("cmoe.plugins.llms", "build_hf_causal_lm"))


@hookimpl
def cmoe_register_attachers(register: Register) -> None:
    from cmoe.plugins.attach_families import FAMILIES
    from cmoe.plugins.attachers import FamilyAttacher, NamedConnectorAttacher

    for family in FAMILIES:
        register(family, FamilyAttacher(family))
    register("auto", NamedConnectorAttacher())
