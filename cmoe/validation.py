"""One type check for every config dataclass: each field against its annotation — types, not truthiness.

``bool`` fields take only ``True``/``False`` (the string ``"no"`` is truthy: it would silently mean True); ``int``
fields refuse bools and floats; ``float`` fields take ints and floats but not bools, NaN or infinity; ``str``,
``list`` and ``dict`` fields take exactly those; ``X | None`` also takes None. Anything else in an annotation
(a class, ``Any``) is left to the dataclass's own checks.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Union

from cmoe.errors import CMoEError

_BOOL_WORDS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}
_hints_cache: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _hints_cache:
        _hints_cache[cls] = typing.get_type_hints(cls)
    return _hints_cache[cls]


def parse_bool(value: object, argument: str) -> bool:
    """A bool from a bool or one of the words true/false, yes/no, on/off, 1/0 (for text from files and the
    environment); anything else raises `CMoEError`."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _BOOL_WORDS:
        return _BOOL_WORDS[value.strip().lower()]
    raise CMoEError(f"{argument}: expected true or false, got {value!r}; write true or false (a bool, not a "
                    "string or number)")


def _describe(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def _problem(value: Any, annotation: Any) -> str | None:
    """None when `value` fits `annotation`, else a description of what was expected."""
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        problems = [_problem(value, a) for a in options if a is not type(None)]
        if any(p is None for p in problems):
            return None
        return " or ".join(p for p in problems if p) + (" or None" if type(None) in options else "")
    if annotation is bool:
        return None if isinstance(value, bool) else "true or false (a bool, not a string or number)"
    if annotation is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "an int"
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return "a number"
        return None if math.isfinite(value) else "a finite number"
    if annotation is str:
        return None if isinstance(value, str) else "a string"
    if annotation is list or origin is list:
        if not isinstance(value, list):
            return "a list" if annotation is list else f"a list ({_describe(annotation)})"
        (item,) = typing.get_args(annotation) or (Any,)
        bad = [v for v in value if item is not Any and _problem(v, item)]
        return f"a list of {_describe(item)}" if bad else None
    if annotation is dict or origin is dict:
        return None if isinstance(value, dict) else "a mapping"
    return None


def check_field_types(instance: Any, prefix: str = "") -> None:
    """Raise `CMoEError` for the first field of the dataclass `instance` whose value does not fit its annotation,
    naming it (``prefix.field``), what was expected and what came."""
    check_values(type(instance), {f.name: getattr(instance, f.name) for f in dataclasses.fields(instance)}, prefix)


def check_values(cls: type, values: dict[str, Any], prefix: str = "") -> None:
    """`check_field_types` for the keyword arguments `values` of the dataclass `cls`, before it is built."""
    hints = _hints(cls)
    for name, value in values.items():
        problem = _problem(value, hints.get(name))
        if problem:
            name = f"{prefix}.{name}" if prefix else name
            raise CMoEError(f"{name}: expected {problem}, got {value!r} ({type(value).__name__}); fix the value "
                            "in the config")
