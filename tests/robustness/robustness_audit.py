"""Shared checks of the robustness audit: what a clear error is, and byte-level damage to files."""

from __future__ import annotations

import re
from pathlib import Path

from cmoe import CMoEError

# A clear error says what to do: what was expected, or a verb naming the fix.
FIX = re.compile(r"\b(expected|expects|use|pass|save|restore|fix|set|add|cast|move|check|remove|skip|write|resume|"
                 r"convert|delete|choose|rename|disable|uninstall|materialise|load|lower|normalise|replace|start|"
                 r"evaluate|install|accepts|known)\b", re.IGNORECASE)


def assert_clear(error: BaseException, *names: str) -> str:
    """`error` is a `CMoEError` whose message names each of `names` (the argument or file) and the fix."""
    assert isinstance(error, CMoEError), f"not a CMoEError: {type(error).__name__}: {error}"
    message = str(error)
    for name in names:
        assert name in message, f"message does not name {name!r}: {message}"
    assert FIX.search(message), f"message names no fix: {message}"
    return message


def flip_bit(path: Path, offset: int) -> None:
    """Flip the lowest bit of the byte at `offset` (negative counts from the end)."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 1
    path.write_bytes(bytes(data))


def truncate(path: Path, fraction: float) -> None:
    """Keep the first `fraction` of the file's bytes (at least one byte less than the whole)."""
    data = path.read_bytes()
    path.write_bytes(data[:min(len(data) - 1, int(len(data) * fraction))])
