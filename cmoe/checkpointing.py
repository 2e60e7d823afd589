"""Directories written as one atomic unit, with a checksum of every file; the one writer every saver uses.

`atomic_directory(path)` yields a sibling temporary directory (``.<name>.tmp-<pid>``); on a clean exit it
writes ``checksums.json`` (SHA-256 and size of every file) last, fsyncs every file and the parent, and renames
the temporary directory into place. A kill at any moment leaves either the old directory or the new one,
never a mix: replacing an existing directory moves the old one aside (``.<name>.old-<pid>``) first, and
`recover_directory` moves it back if a kill fell between the two renames. Temporaries of killed writers are
removed (with a log line) by the next write or load of the same path.

`verify_directory(path)` checks every file against ``checksums.json``: a truncated or bit-flipped file, a
missing one, or a damaged manifest raises `ChecksumError` naming the file. Directories written before
checksums existed (no manifest) still load, with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cmoe.errors import CMoEError

MANIFEST = "checksums.json"
_TMP, _OLD = ".tmp-", ".old-"
logger = logging.getLogger("cmoe.checkpointing")


class CheckpointError(CMoEError):
    """A saved directory that cannot be used: missing, incomplete or damaged."""


class ChecksumError(CheckpointError):
    """A file whose bytes differ from the checksum recorded when it was saved."""


def _stage(name: str) -> None:
    """A named point of a write (``files-written``, ``swapped-old-aside``, ``renamed``). Does nothing; fault
    injection tests replace it in a child process to kill the writer exactly there."""


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)


def _fsync(path: Path) -> None:
    """fsync a file, or a directory's entry table where the platform allows it."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) if path.is_dir() else os.O_RDONLY
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_manifest(directory: str | os.PathLike) -> Path:
    """Record the SHA-256 and size of every file under `directory` in its ``checksums.json``."""
    directory = Path(directory)
    files = {p.relative_to(directory).as_posix(): {"sha256": file_sha256(p), "size": p.stat().st_size}
             for p in _files(directory)}
    path = directory / MANIFEST
    path.write_text(json.dumps({"format": 1, "files": files}, indent=1, sort_keys=True) + "\n")
    return path


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)(?:-[^/]*)?$")


def _stale(parent: Path, name: str, marker: str) -> list[Path]:
    """Leftovers ``.<name><marker><pid>[-suffix]`` whose writer process is gone."""
    found = []
    for path in parent.glob(f".{name}{marker}*"):
        pid = path.name[len(name) + 1 + len(marker):].split("-")[0]
        if not pid.isdigit() or not _pid_alive(int(pid)):
            found.append(path)
    return found


def clean_stale(parent: str | os.PathLike) -> None:
    """`recover_directory` for every path in `parent` that an interrupted save left a temporary for (a training
    run's ``.step_*.tmp-<pid>/``, ``.latest.tmp-<pid>-*``), so killed saves do not pile up."""
    parent = Path(parent)
    if not parent.is_dir():
        return
    for name in sorted({m["name"] for p in parent.iterdir() if (m := _LEFTOVER.match(p.name))}):
        recover_directory(parent / name)


def recover_directory(path: str | os.PathLike) -> None:
    """Repair what a killed `atomic_directory` left at `path`: put back a directory moved aside when the kill
    fell between the two renames, and delete temporaries of dead writers (each with a log line)."""
    path = Path(path)
    parent = path.parent
    if not parent.is_dir():
        return
    for old in sorted(_stale(parent, path.name, _OLD)):
        if not path.exists():
            os.replace(old, path)
            logger.warning("restored %s from %s (a save was interrupted between its renames)", path, old.name)
        else:
            shutil.rmtree(old, ignore_errors=True)
            logger.warning("removed %s, left by an interrupted save of %s", old, path.name)
    for tmp in _stale(parent, path.name, _TMP):
        size = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file()) if tmp.is_dir() else 0
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        logger.warning("removed %s (%.1f MB), the temporary of an interrupted save of %s", tmp, size / 1e6,
                       path.name)


def _copy_file(source: str, target: str) -> None:
    try:
        os.link(source, target)  # a second name for the same bytes: instant, and the old name stays valid
    except OSError:
        shutil.copy2(source, target)


def _link_or_copy(source: Path, target: Path) -> None:
    """Carry `source` into the new directory by hard links where the filesystem allows, else by copying."""
    if source.is_dir():
        shutil.copytree(source, target, copy_function=_copy_file)
    else:
        _copy_file(str(source), str(target))


@contextmanager
def atomic_directory(path: str | os.PathLike, keep_existing_files: bool = True) -> Iterator[Path]:
    """Yield a temporary directory to fill; on success it replaces `path` atomically, with a checksum manifest.

    With `keep_existing_files`, files of an existing `path` that the new contents do not write (a README, a
    tokenizer saved beside the weights) are carried over, unchecked, so nothing the caller did not replace is
    lost. On an exception the temporary directory is removed and `path` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{path}: exists and is not a directory; pass a directory path (or remove the file)")
    recover_directory(path)
    tmp = path.parent / f".{path.name}{_TMP}{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if keep_existing_files and path.is_dir():
            for entry in path.iterdir():
                if entry.name != MANIFEST and not (tmp / entry.name).exists() and not _LEFTOVER.match(entry.name):
                    _link_or_copy(entry, tmp / entry.name)
        new_files = {p.relative_to(tmp).as_posix() for p in _files(tmp)}
        write_manifest(tmp)
        manifest = json.loads((tmp / MANIFEST).read_text())
        manifest["files"] = {k: v for k, v in manifest["files"].items() if k in new_files}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        for file in [*_files(tmp), tmp / MANIFEST]:
            _fsync(file)
        _fsync(tmp)
        _stage("files-written")
        old = None
        if path.exists():
            old = path.parent / f".{path.name}{_OLD}{os.getpid()}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            _stage("swapped-old-aside")
        os.replace(tmp, path)
        _fsync(path.parent)
        _stage("renamed")
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_manifest(directory: str | os.PathLike) -> dict[str, dict] | None:
    """The ``files`` table of `directory`'s ``checksums.json``; None when it has none (written before checksums)."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return None
    try:
        files = json.loads(path.read_text())["files"]
        if not isinstance(files, dict) or not all(isinstance(v, dict) and "sha256" in v for v in files.values()):
            raise ValueError("bad 'files' table")
    except (ValueError, KeyError, TypeError) as error:
        raise ChecksumError(f"{path}: damaged checksum manifest ({error}); the directory cannot be verified, "
                            "save it again or restore it from a backup") from None
    return files


def verify_directory(directory: str | os.PathLike, required: tuple[str, ...] = ()) -> bool:
    """Check every file `directory`'s manifest lists (size, then SHA-256) and that `required` files exist.

    Returns True when verified, False (after a warning) for a directory with no manifest. Raises
    `CheckpointError` for a missing file and `ChecksumError` for a damaged one, naming it and the fix.
    """
    directory = Path(directory)
    recover_directory(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no such directory; pass a directory written by save_pretrained "
                              "or a training checkpoint")
    for name in required:
        if not (directory / name).is_file():
            raise CheckpointError(f"{directory / name}: missing; the directory is incomplete, save it again or "
                                  "restore it from a backup")
    files = read_manifest(directory)
    if files is None:
        logger.warning("%s has no %s (saved before checksums were recorded): its files are not verified",
                       directory, MANIFEST)
        return False
    for name, entry in sorted(files.items()):
        file = directory / name
        if not file.is_file():
            raise CheckpointError(f"{file}: missing, but {MANIFEST} lists it; the directory is incomplete, save "
                                  "it again or restore it from a backup")
        size = file.stat().st_size
        if size != entry.get("size", size) or file_sha256(file) != entry["sha256"]:
            raise ChecksumError(f"{file}: damaged (its SHA-256 or size differs from the one recorded at save "
                                f"time in {MANIFEST}); save it again or restore it from a backup")
    return True
