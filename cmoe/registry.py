"""Named registries (routers, experts, backends, vision encoders, LLMs, attachers), filled by plugins.

Every registry is filled through the pluggy hooks of `cmoe.hookspecs` — the core's built-ins included — the
first time any registry is read (`cmoe.plugin_manager.load_plugins`). Lookup by name is the one path.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from cmoe.errors import CMoEError, UnknownNameError

T = TypeVar("T")


class PluginError(CMoEError):
    """A plugin that cannot be loaded or registers something invalid; the message names its origin."""


class Registry(Generic[T]):
    """A named table of one kind of item, with provenance, type checks and errors that list the known names.

    ``check(item)`` returns None when the item is acceptable, else a description of what was expected.
    """

    def __init__(self, kind: str, check: Callable[[object], str | None] | None = None):
        self.kind = kind
        self._check = check
        self._items: dict[str, T] = {}
        self._origin: dict[str, str] = {}

    def register(self, name: str, item: T, origin: str = "cmoe") -> T:
        """Add `item` under `name`; `origin` names the plugin (and distribution) that provided it."""
        if not isinstance(name, str) or not name:
            raise PluginError(f"{self.kind} name from {origin}: expected a non-empty string, got {name!r}")
        problem = self._check(item) if self._check else None
        if problem:
            raise PluginError(f"{self.kind} {name!r} from {origin}: expected {problem}, got {item!r}")
        if name in self._items:
            raise PluginError(f"{self.kind} {name!r} is registered twice: by {self._origin[name]} and by {origin}; "
                              "rename one of them (or disable a plugin with CMOE_DISABLE_PLUGINS=<name>)")
        self._items[name] = item
        self._origin[name] = origin
        return item

    def remove_origin(self, origin: str) -> None:
        """Drop everything `origin` registered (used when a plugin is unregistered)."""
        for name in [n for n, o in self._origin.items() if o == origin]:
            del self._items[name], self._origin[name]

    def clear(self) -> None:
        self._items.clear()
        self._origin.clear()

    def _loaded(self) -> dict[str, T]:
        from cmoe.plugin_manager import load_plugins

        load_plugins()
        return self._items

    def get(self, name: str) -> T:
        items = self._loaded()
        if name not in items:
            raise UnknownNameError(self.kind, name, items)
        return items[name]

    def origin(self, name: str) -> str:
        self.get(name)
        return self._origin[name]

    def names(self) -> list[str]:
        return sorted(self._loaded())

    def __contains__(self, name: object) -> bool:
        return name in self._loaded()

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


def _is_module_class(item: object) -> str | None:
    from torch import nn

    return None if isinstance(item, type) and issubclass(item, nn.Module) else "an nn.Module subclass"


def _is_experts_class(item: object) -> str | None:
    from cmoe.experts import StackedExperts

    return None if isinstance(item, type) and issubclass(item, StackedExperts) else "a cmoe.StackedExperts subclass"


def _is_backend(item: object) -> str | None:
    from cmoe.dispatch import Backend

    return None if isinstance(item, Backend) else "a cmoe.Backend"


def _is_callable(item: object) -> str | None:
    return None if callable(item) else "a callable builder"


def _is_attacher(item: object) -> str | None:
    missing = [m for m in ("matches", "attach", "detach") if not callable(getattr(item, m, None))]
    return f"an attacher with methods matches/attach/detach (missing {missing})" if missing else None


ROUTERS: Registry = Registry("router", _is_module_class)
EXPERTS: Registry = Registry("expert", _is_experts_class)
BACKENDS: Registry = Registry("backend", _is_backend)
VISION_ENCODERS: Registry = Registry("vision encoder", _is_callable)
LLMS: Registry = Registry("llm", _is_callable)
ATTACHERS: Registry = Registry("attacher", _is_attacher)
COMMANDS: Registry = Registry("command", _is_callable)

REGISTRIES: dict[str, Registry] = {
    "cmoe_register_routers": ROUTERS,
    "cmoe_register_experts": EXPERTS,
    "cmoe_register_backends": BACKENDS,
    "cmoe_register_vision_encoders": VISION_ENCODERS,
    "cmoe_register_llms": LLMS,
    "cmoe_register_attachers": ATTACHERS,
    "cmoe_register_commands": COMMANDS,
}


def get_router(name: str):
    """The router class registered under `name` (a built-in or a plugin's)."""
    return ROUTERS.get(name)


def get_expert(name: str):
    """The experts class registered under `name` (``linear``, ``mlp``, or a plugin's)."""
    return EXPERTS.get(name)


def get_backend(name: str):
    """The dispatch `Backend` registered under `name`."""
    return BACKENDS.get(name)


def get_vision_encoder(name: str):
    """The vision-encoder builder registered under `name`."""
    return VISION_ENCODERS.get(name)


def get_llm(name: str):
    """The LLM builder registered under `name`."""
    return LLMS.get(name)


def get_attacher(name: str):
    """The attacher registered under `name`."""
    return ATTACHERS.get(name)


def get_command(name: str):
    """The ``cmoe`` subcommand registered under `name`."""
    return COMMANDS.get(name)
