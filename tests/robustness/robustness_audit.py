"""Shared checks of the robustness audit: what a clear error is, byte-level damage to files, and the names that
interrupted saves leave (with a snapshot of a folder, to show that a reader changed nothing)."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
from pathlib import Path

from cmoe import CMoEError
from cmoe.leftovers import TMP, Writer, current_writer, process_start

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


def exited_writer() -> Writer:
    """A writer of this host whose process has exited: what a save killed here names in its temporaries."""
    child = subprocess.Popen(["sleep", "60"])
    try:
        start = process_start(child.pid)
    finally:
        child.kill()
        child.wait()
    return dataclasses.replace(current_writer(), pid=child.pid, start=start)


def leftover_name(target: str, kind: str = TMP, writer: Writer | None = None) -> str:
    """The name a save of `target` by `writer` (default: this process) gives its temporary (``old``: the previous
    version moved aside)."""
    return f".{target}.{kind}~{(writer or current_writer()).tag()}~0a1b2c3d"


def snapshot(folder: Path) -> dict[str, tuple]:
    """Every path under `folder` with its kind, inode, size and modification time: equal snapshots mean nothing
    was created, deleted, moved, renamed or rewritten."""
    found = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(root) / name
            info = path.lstat()
            found[path.relative_to(folder).as_posix()] = (path.is_dir(), info.st_ino, info.st_size, info.st_mtime_ns)
    return found
