"""Files and directories written as one atomic unit, with a checksum of every file: the one writer every saver
uses.

`atomic_write(path, write)` writes a file through a sibling temporary, fsyncs it and renames it into place.
`atomic_directory(path)` yields a sibling temporary directory; on a clean exit it writes ``checksums.json``
(SHA-256 and size of every file) last, fsyncs every file and the parent, and renames the temporary directory into
place. A kill at any moment leaves either the old file or directory or the new one, never a mix: replacing an
existing directory moves the old one aside first. Temporaries are named after their writer (`cmoe.leftovers`);
the next write of the same target puts back an old version its dead writer left aside and removes its dead
writers' temporaries. Nothing that reads (`verify_directory`, loading) deletes, moves or renames anything.

`verify_directory(path)` checks every file against ``checksums.json``: a truncated or bit-flipped file, a
missing one, or a damaged manifest raises `ChecksumError` naming the file. Directories written before
checksums existed (no manifest) still load, with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from cmoe import leftovers
from cmoe.errors import CMoEError

MANIFEST = "checksums.json"
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


def _file_mode() -> int:
    """The mode a new file gets under this process's umask (safetensors writes its files 0600 whatever the umask,
    which would hide a run's weights from an evaluation job of another user on a shared folder)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` on a new sibling temporary file, fsync it and rename it to `path` (same folder, so
    the rename is atomic): a reader sees the old file or the new one, never part of one. The file gets the
    permissions the umask allows (`_file_mode`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = leftovers.temporary_path(path)
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        write(str(tmp))
        os.chmod(tmp, _file_mode())
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


@contextmanager
def atomic_directory(path: str | os.PathLike, keep_existing_files: bool = True) -> Iterator[Path]:
    """Yield a temporary directory to fill; on success it replaces `path` atomically, with a checksum manifest.

    With `keep_existing_files`, files of an existing `path` that the new contents do not write (a README, a
    tokenizer saved beside the weights) are carried over, unchecked, so nothing the caller did not replace is
    lost. On an exception the temporary directory is removed and `path` is left as it was. The writer owns its
    target: before writing, it puts back what a dead writer of this host moved aside and removes that writer's
    temporaries (`cmoe.leftovers.clean`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{path}: exists and is not a directory; pass a directory path (or remove the file)")
    leftovers.clean(path.parent, path.name)
    tmp = leftovers.temporary_path(path)
    tmp.mkdir()
    old = None
    try:
        yield tmp
        for file in _files(tmp):  # the caller's files, not those carried over below (hard links to the old ones)
            os.chmod(file, _file_mode())
        if keep_existing_files and path.is_dir():
            for entry in path.iterdir():
                if entry.name != MANIFEST and not (tmp / entry.name).exists() and \
                        leftovers.parse_leftover(entry) is None:
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
        if path.exists():
            old = leftovers.temporary_path(path, leftovers.OLD)
            os.replace(path, old)
            _stage("swapped-old-aside")
        os.replace(tmp, path)
        _fsync(path.parent)
        _stage("renamed")
    except BaseException:
        if old is not None and not path.exists():
            os.replace(old, path)  # the rename into place failed: put the old version back
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def moved_aside(path: str | os.PathLike) -> str | None:
    """When `path` is missing because a save that replaces it moved the old version aside (and was interrupted,
    or is between its two renames right now): a sentence naming the old version and the command that puts it
    back; else None. Reads only."""
    path = Path(path)
    asides = [item for item in leftovers.find_leftovers(path.parent, path.name) if item.kind == leftovers.OLD]
    if path.exists() or not asides:
        return None
    return (f"{path} is not there, but {asides[0].path.name} beside it holds its previous version, moved aside by a "
            f"save that replaces it (interrupted, or still running); try again in a moment, or, if no save is "
            f"running, `cmoe clean {path.parent}` puts it back (a reader never moves it)")


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
    if not directory.is_dir():
        raise CheckpointError(moved_aside(directory) or f"{directory}: no such directory; pass a directory written "
                              "by save_pretrained or a training checkpoint")
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
        try:
            size = file.stat().st_size
            same = size == entry.get("size", size) and file_sha256(file) == entry["sha256"]
        except OSError as error:  # removed or replaced while being read (a run pruning old checkpoints)
            raise CheckpointError(f"{file}: could not be read ({error}); it was removed while being read, or the "
                                  "disk failed: load it again, or restore it from a backup") from None
        if not same:
            raise ChecksumError(f"{file}: damaged (its SHA-256 or size differs from the one recorded at save "
                                f"time in {MANIFEST}); save it again or restore it from a backup")
    return True
