"""Hosts on one machine, for tests: each its own PID, UTS and mount namespace (``unshare -p -f --mount-proc -u``,
which needs root, as CI runs) with its own host name, kept alive by a small init that reaps orphans. Commands run
inside through ``nsenter``; the network is shared, so torchrun's nodes reach each other on 127.0.0.x, and the file
system is shared, so a folder is seen by every host as a run folder on NFS would be (a mount made inside one
host, such as a tmpfs over that folder, stays its own: a node-local folder)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

INIT = """
import os, socket, sys, time
socket.sethostname(sys.argv[1])
print("ready", flush=True)
while True:
    try:
        os.waitpid(-1, 0)
    except ChildProcessError:
        time.sleep(0.05)
"""
UNSHARE = ["unshare", "-p", "-f", "--mount-proc", "-u"]


def unavailable() -> str | None:
    """Why hosts cannot be made here, or None when they can."""
    for tool in ("unshare", "nsenter"):
        if shutil.which(tool) is None:
            return f"{tool} (util-linux) is not installed"
    try:
        result = subprocess.run([*UNSHARE, "true"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"unshare failed: {error}"
    if result.returncode != 0:
        return (f"`{' '.join(UNSHARE)}` is not permitted here ({result.stderr.strip()[:200]}); it needs root (CI runs "
                "as root)")
    return None


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2:].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Host:
    """One host: its namespaces live as long as its init (``close`` ends them, and every process inside)."""

    def __init__(self, name: str, cwd: str | os.PathLike) -> None:
        self.name, self.cwd = name, str(cwd)
        self._unshare = subprocess.Popen([*UNSHARE, sys.executable, "-c", INIT, name], stdout=subprocess.PIPE,
                                         text=True)
        line = self._unshare.stdout.readline().strip()
        if line != "ready":
            raise RuntimeError(f"host {name} did not start: {line!r}")
        (self.init,) = _children(self._unshare.pid)

    def command(self, args: list[str]) -> list[str]:
        return ["nsenter", "-t", str(self.init), "-p", "-u", "-m", f"--wd={self.cwd}", *args]

    def popen(self, args: list[str], log: Path | None = None, **kwargs) -> subprocess.Popen:
        """Start `args` in this host, stdout and stderr to `log` (else captured)."""
        out = open(log, "w") if log is not None else subprocess.PIPE
        kwargs.setdefault("stderr", subprocess.STDOUT if log is not None else subprocess.PIPE)
        try:
            return subprocess.Popen(self.command(args), stdout=out, text=True, **kwargs)
        finally:
            if log is not None:
                out.close()

    def run(self, args: list[str], **kwargs) -> subprocess.CompletedProcess:
        kwargs.setdefault("capture_output", True)
        return subprocess.run(self.command(args), text=True, **kwargs)

    def kill_all(self) -> None:
        """SIGKILL every process of this host but its init, as if the node died; its namespaces stay, so a job
        restarted here sees the same PIDs (and can prove the old ones dead)."""
        self.run(["sh", "-c", "kill -9 -1 2>/dev/null; exit 0"], timeout=60)

    def close(self) -> None:
        try:
            os.kill(self.init, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._unshare.wait(timeout=60)
        self._unshare.stdout.close()
