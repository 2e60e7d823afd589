"""Named registries (routers, experts, backends, vision encoders, LLMs, attachers, commands), filled by plugins.

A leaf of the core: it imports no cmoe module but `cmoe.errors` and knows nothing of who fills it. The filler
installs itself (`cmoe.plugin_manager` does when imported, which ``import cmoe`` always does): `set_loader`, a
function run before every lookup, so the first lookup loads the plugins; and `Registry.expect`, what each
registry accepts, since those types live above this module. Lookup by name is the one path.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from cmoe.errors import CMoEError, UnknownNameError

T = TypeVar("T")

Check = Callable[[object], str | None]
"""``check(item)``: None when the item is acceptable, else a description of what was expected."""

_loader: Callable[[], object] | None = None


def set_loader(loader: Callable[[], object] | None) -> None:
    """Install the function that fills every registry (`cmoe.plugin_manager.load_plugins`). It runs before every
    lookup, so it must return at once when everything is loaded; None: lookups read what is registered."""
    global _loader
    _loader = loader


class PluginError(CMoEError):
    """A plugin that cannot be loaded or registers something invalid; the message names its origin."""


class Registry(Generic[T]):
    """A named table of one kind of item, with provenance, type checks and errors that list the known names."""

    def __init__(self, kind: str, check: Check | None = None):
        self.kind = kind
        self._check = check
        self._items: dict[str, T] = {}
        self._origin: dict[str, str] = {}

    def expect(self, check: Check | None) -> None:
        """Set what `register` accepts (see `Check`); the filler declares it (`cmoe.plugin_manager.HOOKS`)."""
        self._check = check

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
        if _loader is not None:
            _loader()
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


ROUTERS: Registry = Registry("router")
EXPERTS: Registry = Registry("expert")
BACKENDS: Registry = Registry("backend")
VISION_ENCODERS: Registry = Registry("vision encoder")
LLMS: Registry = Registry("llm")
ATTACHERS: Registry = Registry("attacher")
COMMANDS: Registry = Registry("command")


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
