"""Name → factory registries for routers, experts and dispatch backends.

The core registers its built-ins here; plugins add theirs through the same `register` call, so lookup by
name (`get_router("token_topk")`) is the one path for everything.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from cmoe.errors import CMoEError, UnknownNameError

T = TypeVar("T")


class Registry(Generic[T]):
    """A named table of factories of one kind, with errors that list the known names."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}
        self._origin: dict[str, str] = {}

    def register(self, name: str, item: T, origin: str = "cmoe") -> T:
        """Add `item` under `name`; `origin` names the package that provided it (shown in errors and listings)."""
        if not isinstance(name, str) or not name:
            raise CMoEError(f"{self.kind} name: expected a non-empty string, got {name!r} (from {origin})")
        if name in self._items:
            raise CMoEError(
                f"{self.kind} {name!r} is registered twice: by {self._origin[name]} and by {origin}; "
                "rename one of them"
            )
        self._items[name] = item
        self._origin[name] = origin
        return item

    def unregister(self, name: str) -> None:
        self._items.pop(name, None)
        self._origin.pop(name, None)

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise UnknownNameError(self.kind, name, self._items) from None

    def origin(self, name: str) -> str:
        self.get(name)
        return self._origin[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


Factory = Callable[..., object]
