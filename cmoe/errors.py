"""Exceptions raised by cmoe: one clear message saying what was wrong and how to fix it."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable

import torch


class CMoEError(ValueError):
    """Bad input or configuration given to a cmoe API."""


class UnknownNameError(CMoEError):
    """A router, expert, backend or plugin name that nothing registered."""

    def __init__(self, kind: str, name: str, known: Iterable[str]):
        self.kind, self.name, self.known = kind, name, sorted(known)
        super().__init__(f"unknown {kind} {name!r}; known {kind}s: {', '.join(self.known) or '(none)'}")


def expect(condition: bool, argument: str, expected: str | Callable[[], str], got: object) -> None:
    """Raise `CMoEError` naming `argument`, what was `expected` and what was given, unless `condition`.

    `expected` and `got` may be zero-argument callables, formatted only on failure: messages that print shapes
    pass them so, since ``torch.compile`` cannot turn a symbolic size into text while it traces.
    """
    if not condition:
        expected = expected() if callable(expected) else expected
        got = got() if callable(got) and not isinstance(got, type) else got
        raise CMoEError(f"{argument}: expected {expected}, got {got}")


def expect_ids_below(ids: torch.Tensor, count: int, argument: str, expected: str) -> None:
    """Raise `CMoEError` unless every value of the integer tensor `ids` is in ``0..count-1``.

    Reads the range back to the host, so callers run it on CPU tensors only: there an out-of-range id would
    crash deep inside indexing, and the read costs nothing; on a GPU it would stall the stream every step.
    Skipped while ``torch.compile`` traces, where reading a value back would break the graph.
    """
    if not ids.numel() or torch.compiler.is_compiling():
        return
    lo, hi = int(ids.min()), int(ids.max())
    expect(lo >= 0 and hi < count, argument, expected, f"values in {lo}..{hi}")


_VARIABLE = re.compile(r"\$(\w+)|\$\{(\w+)\}")


def unset_variables(text: str | os.PathLike) -> set[str]:
    """The ``$X`` / ``${X}`` still written in `text` whose variable is not set (so a config did not expand it)."""
    return {a or b for a, b in _VARIABLE.findall(os.fspath(text)) if (a or b) not in os.environ}


def unset_variables_hint(path: str | os.PathLike) -> str:
    """``" (the environment variable X is not set: ...)"`` when `path` still holds a ``$X`` / ``${X}`` (a config's
    variable that was not set, so not expanded), else ``""``: appended to a missing-path message."""
    unset = sorted(unset_variables(path))
    if not unset:
        return ""
    many = len(unset) > 1
    return (f" (the environment variable{'s' if many else ''} {', '.join(unset)} {'are' if many else 'is'} not set: "
            f"export {unset[0]}=/path/to/the/local/files)")


def missing_path(path: str | os.PathLike, what: str = "does not exist") -> str:
    """`path` quoted, why it cannot be used, and any unset variable left in it (`unset_variables_hint`)."""
    return f"{os.fspath(path)!r}, which {what}{unset_variables_hint(path)}"
