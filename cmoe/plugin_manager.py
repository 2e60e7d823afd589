"""The one pluggy plugin manager: built-ins, then every installed distribution's ``cmoe`` entry points.

Created on the first registry lookup: importing this module makes it the registries' filler (`cmoe.registry` is
a leaf that imports none of this): `load_plugins` runs before every lookup, and `HOOKS` says which registry each
hook fills and what that registry accepts. Each hook implementation is called with a ``register`` bound to its
own plugin's name, so every registered item knows where it came from (shown by ``cmoe plugins list`` and in
every error). ``CMOE_DISABLE_PLUGINS=a,b`` skips entry points by name.
"""

from __future__ import annotations

import importlib.metadata
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import pluggy
from torch import nn

from cmoe import core_plugin, hookspecs
from cmoe.dispatch import Backend
from cmoe.experts import StackedExperts
from cmoe.registry import (
    ATTACHERS,
    BACKENDS,
    COMMANDS,
    EXPERTS,
    LLMS,
    ROUTERS,
    VISION_ENCODERS,
    Check,
    PluginError,
    Registry,
    set_loader,
)


def _subclass_of(base: type, expected: str) -> Check:
    return lambda item: None if isinstance(item, type) and issubclass(item, base) else expected


def _is_backend(item: object) -> str | None:
    return None if isinstance(item, Backend) else "a cmoe.Backend"


def _is_callable(item: object) -> str | None:
    return None if callable(item) else "a callable builder"


def _is_attacher(item: object) -> str | None:
    missing = [m for m in ("matches", "attach", "detach") if not callable(getattr(item, m, None))]
    return f"an attacher with methods matches/attach/detach (missing {missing})" if missing else None


HOOKS: dict[str, tuple[Registry, Check]] = {
    "cmoe_register_routers": (ROUTERS, _subclass_of(nn.Module, "an nn.Module subclass")),
    "cmoe_register_experts": (EXPERTS, _subclass_of(StackedExperts, "a cmoe.StackedExperts subclass")),
    "cmoe_register_backends": (BACKENDS, _is_backend),
    "cmoe_register_vision_encoders": (VISION_ENCODERS, _is_callable),
    "cmoe_register_llms": (LLMS, _is_callable),
    "cmoe_register_attachers": (ATTACHERS, _is_attacher),
    "cmoe_register_commands": (COMMANDS, _is_callable),
}
"""Hook name -> the registry it fills and what that registry accepts (`cmoe.registry.Check`)."""
REGISTRIES: tuple[Registry, ...] = tuple(registry for registry, _ in HOOKS.values())

ENTRY_POINT_GROUP = hookspecs.PROJECT
BUILTIN = "cmoe.core_plugin"

_lock = threading.RLock()
_manager: pluggy.PluginManager | None = None
_loading = False
_origins: dict[str, str] = {}


@dataclass(frozen=True)
class PluginSource:
    """An entry point in group ``cmoe`` and the distribution that declares it."""

    entry_point: importlib.metadata.EntryPoint
    distribution: str
    version: str

    def describe(self) -> str:
        return (f"entry point {self.entry_point.name!r} = {self.entry_point.value!r} "
                f"of distribution {self.distribution} {self.version}")


def _normalise(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def iter_entry_points() -> Iterator[PluginSource]:
    """Every entry point of group ``cmoe`` in the installed distributions. One distribution found twice on
    ``sys.path`` is read once; two distributions that use the same entry-point name are both kept (a name
    does not identify a plugin across packages: dropping one would silently replace cmoe's own)."""
    seen: set[tuple[str, str, str]] = set()
    for dist in importlib.metadata.distributions():
        dist_name = dist.metadata["Name"] or "?"
        for ep in dist.entry_points:
            key = (_normalise(dist_name), ep.name, ep.value)
            if ep.group == ENTRY_POINT_GROUP and key not in seen:
                seen.add(key)
                yield PluginSource(ep, dist_name, dist.version)


def _disabled() -> set[str]:
    return {n.strip() for n in os.environ.get("CMOE_DISABLE_PLUGINS", "").split(",") if n.strip()}


def _collect(manager: pluggy.PluginManager, plugin_name: str) -> None:
    """Call `plugin_name`'s hook implementations, registering into the registries with its origin."""
    plugin = manager.get_plugin(plugin_name)
    origin = _origins[plugin_name]
    for hook_name, (registry, _) in HOOKS.items():
        for impl in getattr(manager.hook, hook_name).get_hookimpls():
            if impl.plugin is plugin:
                def register(name: str, item: object, _registry=registry) -> object:
                    return _registry.register(name, item, origin=origin)
                try:
                    impl.function(register=register)
                except PluginError:
                    raise
                except (Exception, SystemExit) as error:
                    raise PluginError(f"plugin {origin}: {hook_name} failed: {type(error).__name__}: {error}; fix "
                                      "or uninstall the plugin, or disable it with CMOE_DISABLE_PLUGINS") from error


def _add(manager: pluggy.PluginManager, plugin: object, name: str, origin: str) -> None:
    try:
        manager.register(plugin, name=name)
        manager.check_pending()
    except pluggy.PluginValidationError as error:
        if manager.get_plugin(name) is not None:
            manager.unregister(name=name)
        raise PluginError(f"plugin {origin} is not a valid cmoe plugin: {error}; fix its hooks (see cmoe.hookspecs) "
                          "or uninstall it") from error
    _origins[name] = origin
    _collect(manager, name)


def load_plugins() -> pluggy.PluginManager:
    """Create the plugin manager and fill every registry, once; later calls return the same manager."""
    global _manager, _loading
    if _manager is not None or _loading:
        return _manager  # type: ignore[return-value]
    with _lock:
        if _manager is not None or _loading:
            return _manager  # type: ignore[return-value]
        _loading = True
        try:
            manager = pluggy.PluginManager(hookspecs.PROJECT)
            manager.add_hookspecs(hookspecs)
            _add(manager, core_plugin, BUILTIN, "cmoe (built-in)")
            disabled = _disabled()
            for source in iter_entry_points():
                name = source.entry_point.name
                if name in disabled:
                    continue
                if manager.has_plugin(name):  # the same name from another distribution: keep both
                    name = f"{name}@{source.distribution}"
                    if manager.has_plugin(name):
                        continue
                try:
                    plugin = source.entry_point.load()
                except (Exception, SystemExit) as error:
                    raise PluginError(f"cmoe plugin failed to import: {source.describe()}: "
                                      f"{type(error).__name__}: {error}. Fix or uninstall "
                                      f"{source.distribution}, or set CMOE_DISABLE_PLUGINS={name}") from error
                _add(manager, plugin, name, f"{name} ({source.distribution} {source.version})")
            _manager = manager
        except BaseException:
            for registry in REGISTRIES:
                registry.clear()
            _origins.clear()
            raise
        finally:
            _loading = False
    return _manager


def get_plugin_manager() -> pluggy.PluginManager:
    """The loaded plugin manager (loading plugins on first use)."""
    return load_plugins()


def register_plugin(plugin: object, name: str | None = None) -> str:
    """Register a plugin object at run time (e.g. in a test or a notebook); returns its name."""
    manager = load_plugins()
    name = name or getattr(plugin, "__name__", None) or type(plugin).__name__
    if manager.has_plugin(name):
        raise PluginError(f"a plugin named {name!r} is already registered; pass another name")
    _add(manager, plugin, name, name)
    return name


def unregister_plugin(name: str) -> None:
    """Remove a plugin registered at run time and everything it registered."""
    manager = load_plugins()
    if not manager.has_plugin(name):
        raise PluginError(f"no plugin named {name!r}; registered: {sorted(n for n, _ in manager.list_name_plugin())}")
    origin = _origins.pop(name)
    for registry in REGISTRIES:
        registry.remove_origin(origin)
    manager.unregister(name=name)


def reset_plugins() -> None:
    """Forget every plugin and registered item; the next lookup loads everything again."""
    global _manager
    with _lock:
        _manager = None
        _origins.clear()
        for registry in REGISTRIES:
            registry.clear()


def list_plugins() -> list[tuple[str, str, str]]:
    """``(kind, name, origin)`` for every registered item, sorted."""
    load_plugins()
    return sorted((registry.kind, name, registry.origin(name)) for registry in REGISTRIES
                  for name in registry.names())


def _install() -> None:
    """Make this module the registries' filler: what each one accepts, and `load_plugins` before every lookup."""
    for registry, check in HOOKS.values():
        registry.expect(check)
    set_loader(load_plugins)


_install()
