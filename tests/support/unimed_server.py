"""``cmoe unimed serve`` as a person starts it: a subprocess on 127.0.0.1 and a free port, its URL read from the
line it prints, stopped with SIGTERM; `Server.stop` checks that it exits cleanly and leaves no process or port
behind. Shared by tests/unimed/inference/test_unimed_serve.py (HTTP API) and tests/unimed/inference/test_unimed_browser.py (headless chromium)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import psutil

START_LIMIT_S = 300
"""How long to wait for the ``serving on`` line before giving up (a bound against a hang, not a timing check)."""


class Server:
    """A running ``cmoe unimed serve --config tiny --output-dir RUN --port 0``; `url` is what it printed."""

    def __init__(self, run: Path, logs: Path, *extra: str) -> None:
        logs.mkdir(parents=True, exist_ok=True)
        self.stdout, self.stderr = logs / "serve.out", logs / "serve.err"
        env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "GRADIO_TEMP_DIR": str(logs / "gradio")}
        with self.stdout.open("w") as out, self.stderr.open("w") as err:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "cmoe", "unimed", "serve", "--config", "tiny", "--output-dir", str(run),
                 "--port", "0", *extra], stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env)
        self.url = self._wait_for_url()

    def _wait_for_url(self) -> str:
        deadline = time.monotonic() + START_LIMIT_S
        while time.monotonic() < deadline:
            found = re.search(r"^serving on (http://127\.0\.0\.1:\d+)$", self.stdout.read_text(), re.MULTILINE)
            if found:
                return found.group(1)
            if self.process.poll() is not None:
                break
            time.sleep(0.2)
        self.process.kill()
        self.process.wait()
        raise AssertionError(f"cmoe unimed serve printed no 'serving on' line (exit {self.process.returncode}); "
                             f"stdout:\n{self.stdout.read_text()}\nstderr:\n{self.stderr.read_text()[-3000:]}")

    def stop(self) -> int:
        """SIGTERM, wait, and check that nothing is left: no child process, nothing listening on the port."""
        if self.process.poll() is not None:
            return self.process.returncode
        children = psutil.Process(self.process.pid).children(recursive=True)
        self.process.terminate()
        try:
            code = self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError("cmoe unimed serve did not stop within 60 s of SIGTERM; killed") from None
        _, alive = psutil.wait_procs(children, timeout=10)
        for leftover in alive:
            leftover.kill()
        assert not alive, f"processes left behind: {alive}"
        address = urlparse(self.url)
        with socket.socket() as probe:
            assert probe.connect_ex((address.hostname, address.port)) != 0, f"{self.url} still accepts connections"
        return code
