"""Temporaries of interrupted writes, named after their writer, so that only a provable death removes them.

Every temporary `cmoe.checkpointing` writes is a sibling of its target named
``.<target>.tmp~<host>~<boot>~<pidns>~<pid>~<start>~<nonce>`` (``.old~`` for a directory moved aside while it
is replaced): the host name (for people), the boot id and the PID namespace (whose PIDs a process can check), the
PID and the process's start time (so that a reused PID is not taken for the writer). A run folder on NFS or Lustre
is seen by several hosts: a PID means something only on the host, boot and namespace that wrote it.

A writer is *dead* when this process can prove it: same boot and PID namespace, and no process with that PID
started at that time. A writer on another host, in another namespace or boot, or a name in the older
``.<target>.tmp-<pid>`` format, is *unknown* here: reported, never removed, unless the user says so
(``cmoe clean DIR --older-than AGE``). Readers only `note` leftovers; owners (a training run's rank 0 at start,
the next save of the same target, ``cmoe clean``) `clean` them.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from cmoe.errors import CMoEError

logger = logging.getLogger("cmoe.leftovers")

TMP, OLD = "tmp", "old"
ALIVE, DEAD, UNKNOWN = "alive", "dead", "unknown"
_NAME = re.compile(r"^\.(?P<target>.+)\.(?P<kind>tmp|old)~(?P<host>[^~]*)~(?P<boot>[0-9a-f]*)~(?P<pidns>[0-9]*)~"
                   r"(?P<pid>[0-9]+)~(?P<start>[0-9]+)~(?P<nonce>[0-9a-z]+)$")
_LEGACY = re.compile(r"^\.(?P<target>.+)\.(?P<kind>tmp|old)-(?P<pid>[0-9]+)(?:-[^~/]*)?$")
_AGE = re.compile(r"^\s*(?P<value>[0-9]+(?:\.[0-9]+)?)\s*(?P<unit>s|m|h|d)?\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


@dataclass(frozen=True)
class Writer:
    """Who wrote a temporary: enough to tell, on the same machine and namespace, whether it still runs."""

    host: str
    boot: str  # the first 12 hex digits of the kernel's boot id; "" where there is none (not Linux)
    pidns: str  # the inode of the PID namespace; "" where unknown
    pid: int
    start: int  # start time in clock ticks since boot (/proc/<pid>/stat); 0 where unknown

    def tag(self) -> str:
        return f"{self.host}~{self.boot}~{self.pidns}~{self.pid}~{self.start}"

    def where(self) -> str:
        return f"pid {self.pid} on {self.host}"


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


def _stat_fields(pid: int | str) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` from the state on (field 3), or None when there is no such process."""
    text = _read(f"/proc/{pid}/stat")
    if not text or ")" not in text:
        return None
    return text[text.rindex(")") + 2:].split()


def _proc_is_ours() -> bool:
    """Whether /proc shows this process's PID namespace (``unshare -p`` without ``--mount-proc`` leaves the
    parent's): only then do PIDs of this namespace name the right ``/proc/<pid>``."""
    text = _read("/proc/self/stat")
    return bool(text) and text.split(" ", 1)[0] == str(os.getpid())


def process_start(pid: int) -> int | None:
    """Start time of process `pid` of this PID namespace in clock ticks since boot; 0 when it runs but its start
    time cannot be read (no /proc, or a /proc that hides other users' processes); None when no such process runs
    (a zombie counts as gone)."""
    fields = _stat_fields(pid) if _proc_is_ours() else None
    if fields is not None:
        return None if fields[0] in ("Z", "X") else int(fields[19])
    try:
        os.kill(pid, 0)  # a process /proc does not show (hidepid) still answers: EPERM
    except ProcessLookupError:
        return None
    except PermissionError:
        return 0
    return 0


def _host() -> str:
    name = re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname())[:64]
    return name or "host"


_CURRENT: dict[int, Writer] = {}


def current_writer() -> Writer:
    """This process as a `Writer` (computed once per process: a fork gets its own)."""
    pid = os.getpid()
    if pid not in _CURRENT:
        boot = (_read("/proc/sys/kernel/random/boot_id") or "").strip().replace("-", "")[:12]
        try:
            pidns = str(os.stat("/proc/self/ns/pid").st_ino)
        except OSError:
            pidns = ""
        start = process_start(pid) if boot else 0
        _CURRENT.clear()
        _CURRENT[pid] = Writer(_host(), boot, pidns if boot else "", pid, start or 0)
    return _CURRENT[pid]


def temporary_path(target: str | os.PathLike, kind: str = TMP) -> Path:
    """A new sibling name for a temporary of `target` (``kind`` tmp) or its old version moved aside (old)."""
    target = Path(target)
    return target.parent / f".{target.name}.{kind}~{current_writer().tag()}~{secrets.token_hex(4)}"


def writer_status(writer: Writer | None) -> str:
    """``alive``, ``dead`` (provably: same boot and PID namespace, no such process since it started) or
    ``unknown`` (another host, boot or namespace, or a name that does not say)."""
    if writer is None:
        return UNKNOWN
    me = current_writer()
    if me.boot or writer.boot:
        same = bool(me.boot) and (writer.boot, writer.pidns) == (me.boot, me.pidns) and bool(me.pidns)
    else:
        same = writer.host == me.host
    if not same:
        return UNKNOWN
    start = process_start(writer.pid)
    if start is None:
        return DEAD
    if start and writer.start and start != writer.start:
        return DEAD  # the PID was reused by a later process
    return ALIVE


@dataclass(frozen=True)
class Leftover:
    """A temporary in a folder: its path, the target it was for, its kind and its writer (None: not named)."""

    path: Path
    target: Path
    kind: str
    writer: Writer | None

    def status(self) -> str:
        return writer_status(self.writer)

    def age(self) -> float:
        """Seconds since anything in it was last modified."""
        newest = 0.0
        for path in [self.path, *(self.path.rglob("*") if self.path.is_dir() else ())]:
            try:
                newest = max(newest, path.lstat().st_mtime)
            except OSError:
                pass
        return max(0.0, time.time() - newest)

    def describe(self) -> str:
        what = "a save" if self.kind == TMP else "the previous version, moved aside by a save"
        who = f"by {self.writer.where()}" if self.writer else "by a writer it does not name (an older format)"
        return f"{self.path.name}: {what} of {self.target.name} {who}"

    def remedy(self, command: str) -> str:
        """How to remove it, by its status here: `command` removes a dead writer's; an unknown one's needs the
        writer's host, or an age."""
        status = self.status()
        if status == DEAD:
            return f"its writer is gone: `{command}` removes it, and so does the next training start there"
        if status == ALIVE:
            return "its writer still runs"
        if self.writer is None:
            return (f"this host cannot check its writer; once no save runs into this folder, `{command} --older-than "
                    "1h` removes it if untouched for an hour")
        return (f"this host cannot check whether {self.writer.where()} still runs; once no save runs there, "
                f"`{command}` on {self.writer.host} removes it, or `{command} --older-than 1h` anywhere if it is "
                "untouched for an hour")


def parse_leftover(path: Path) -> Leftover | None:
    """The `Leftover` a path's name describes, or None when it is not a temporary's name."""
    match = _NAME.match(path.name)
    if match:
        writer = Writer(match["host"], match["boot"], match["pidns"], int(match["pid"]), int(match["start"]))
        return Leftover(path, path.parent / match["target"], match["kind"], writer)
    match = _LEGACY.match(path.name)
    if match:
        return Leftover(path, path.parent / match["target"], match["kind"], None)
    return None


def find_leftovers(folder: str | os.PathLike, target: str | None = None, recursive: bool = False) -> list[Leftover]:
    """Every temporary in `folder` (of `target` only, when given; in its sub-folders too with `recursive`),
    sorted so that each target's old version comes before its temporaries."""
    folder = Path(folder)
    found: list[Leftover] = []
    for root, dirs, files in os.walk(folder) if folder.is_dir() else ():
        for name in dirs + files:
            leftover = parse_leftover(Path(root) / name)
            if leftover and (target is None or leftover.target.name == target):
                found.append(leftover)
        dirs[:] = [d for d in dirs if recursive and parse_leftover(Path(root) / d) is None]
    return sorted(found, key=lambda item: (str(item.target), item.kind != OLD, item.path.name))


def _size(path: Path) -> int:
    """Bytes in a file or folder (0 for what vanished meanwhile: another cleaner was first)."""
    total = 0
    for item in [path, *(path.rglob("*") if path.is_dir() else ())]:
        try:
            total += item.lstat().st_size if item.is_file() else 0
        except OSError:
            pass
    return total


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@dataclass
class Cleaned:
    """What `clean` did: one line per leftover, and which were kept (alive, or unknown here)."""

    lines: list[str] = field(default_factory=list)
    removed: list[Path] = field(default_factory=list)
    restored: list[Path] = field(default_factory=list)
    kept: list[Leftover] = field(default_factory=list)

    def summary(self, dry_run: bool = False) -> str:
        verb = "would remove" if dry_run else "removed"
        return (f"{verb} {len(self.removed)} and {'would restore' if dry_run else 'restored'} {len(self.restored)} "
                f"leftover(s) of interrupted saves; kept {len(self.kept)}")


def clean(folder: str | os.PathLike, target: str | None = None, *, command: str | None = None,
          older_than: float | None = None, dry_run: bool = False, recursive: bool = False,
          log: bool = True) -> Cleaned:
    """Remove the temporaries in `folder` whose writer is provably dead, and put back an old version moved aside
    whose target is missing; with `older_than` (seconds), also those of unknown writers untouched that long.
    Temporaries of live writers are never touched. Each action is logged; each kept leftover that is not alive
    is logged with `command` (default ``cmoe clean <folder>``), the command that removes it (`log` False: the
    lines are only returned, for the command line to print)."""
    folder = Path(folder)
    command = command or f"cmoe clean {folder}"
    done = Cleaned()
    verb = "would " if dry_run else ""
    for leftover in find_leftovers(folder, target, recursive):
        status = leftover.status()
        forced = status == UNKNOWN and older_than is not None and leftover.age() >= older_than
        if status != DEAD and not forced:
            done.kept.append(leftover)
            line = f"kept {leftover.describe()}: {leftover.remedy(command)}"
            done.lines.append(line)
            if log:
                logger.log(logging.INFO if status == ALIVE else logging.WARNING, "%s", line)
            continue
        why = "its writer is gone" if status == DEAD else f"untouched for {leftover.age():.0f} s (--older-than)"
        if leftover.kind == OLD and not leftover.target.exists():
            if not dry_run:
                try:
                    os.replace(leftover.path, leftover.target)
                except OSError as error:  # another cleaner was first, or the target appeared meanwhile
                    done.lines.append(f"could not restore {leftover.target.name} from {leftover.path.name}: {error}")
                    done.kept.append(leftover)
                    continue
            done.restored.append(leftover.target)
            line = f"{verb}restore {leftover.target} from {leftover.path.name} ({why}; a save was interrupted " \
                   "between its renames)"
        else:
            size = _size(leftover.path)
            if not dry_run:
                _remove(leftover.path)
            done.removed.append(leftover.path)
            line = f"{verb}remove {leftover.path} ({size / 1e6:.1f} MB; {why}), left by an interrupted save " \
                   f"of {leftover.target.name}"
        done.lines.append(line)
        if log:
            logger.warning("%s", line)
    return done


_NOTED: set[tuple[str, str]] = set()


def note(folder: str | os.PathLike, command: str | None = None) -> list[Leftover]:
    """For readers: log (once per process and leftover) the temporaries in `folder` that are skipped, and, for
    those not provably alive, the command that removes them. Changes nothing; returns them."""
    folder = Path(folder)
    command = command or f"cmoe clean {folder}"
    found = find_leftovers(folder)
    for leftover in found:
        status = leftover.status()
        if (str(leftover.path), status) in _NOTED:
            continue
        _NOTED.add((str(leftover.path), status))
        if status == ALIVE:
            logger.info("skipped %s: still being written", leftover.describe())
        else:
            logger.warning("skipped %s: %s", leftover.describe(), leftover.remedy(command))
    return found


def parse_age(text: str) -> float:
    """Seconds in an age such as ``90``, ``90s``, ``30m``, ``2h`` or ``1d``; `CMoEError` for anything else."""
    match = _AGE.match(str(text))
    if not match:
        raise CMoEError(f"--older-than: expected an age such as 90s, 30m, 2h or 1d, got {text!r}")
    return float(match["value"]) * _UNITS[match["unit"] or "s"]
