"""Run by tests/unimed/training/test_unimed_multinode.py under torchrun, one process per node: ``cmoe unimed train ARGS``, with the
faults in ``$CMOE_TEST_FAULTS`` (a JSON list) injected on rank 0 at the kill points of the robustness audit.
Each fault fires once: it first creates its ``flag`` file, and a worker restarted later (torchrun's
``--max-restarts``, or the test) skips a fault whose flag exists. A fault is ``{"action", "at", "nth", "flag"}``:

* ``at``: a stage of `cmoe.checkpointing.atomic_directory` (``files-written``, ``swapped-old-aside``, ``renamed``),
  ``checkpoint-before-latest``, or ``optimizer-write`` (writing a checkpoint's optimizer.safetensors); ``nth``:
  which occurrence in this process (1 = the first save);
* ``action``: ``pause`` (wait until ``<flag>.go`` exists, then go on: a reader runs meanwhile), ``hold`` (wait to
  be killed with the node), ``die`` (SIGKILL itself), ``half`` (optimizer-write: write half the file, then hold),
  ``disk-full`` (optimizer-write: raise ENOSPC).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import cmoe.checkpointing as checkpointing
import cmoe.reference_models.unimed.model.checkpoint as checkpoint
from cmoe.cli import main

FAULTS = [f for f in json.loads(os.environ.get("CMOE_TEST_FAULTS", "[]")) if not Path(f["flag"]).exists()]
SEEN: dict[str, int] = {}


def _wait_forever() -> None:
    while True:
        time.sleep(0.05)


def _due(at: str) -> dict | None:
    """The fault due at this occurrence of `at`, or None."""
    SEEN[at] = SEEN.get(at, 0) + 1
    return next((f for f in FAULTS if f["at"] == at and f["nth"] == SEEN[at]), None)


def _fired(fault: dict) -> None:
    """Record that `fault` fired (the test waits for this file; a restarted worker skips the fault)."""
    Path(fault["flag"]).write_text(str(os.getpid()))


def stage(name: str) -> None:
    fault = _due(name)
    if fault is None:
        return
    _fired(fault)
    if fault["action"] == "pause":
        while not Path(fault["flag"] + ".go").exists():
            time.sleep(0.05)
    elif fault["action"] == "hold":
        _wait_forever()
    elif fault["action"] == "die":
        os.kill(os.getpid(), signal.SIGKILL)


REAL_SAVE = checkpoint.save_file


def save_file(tensors, path, metadata=None):
    fault = _due("optimizer-write") if str(path).endswith("optimizer.safetensors") else None
    if fault is not None and fault["action"] == "disk-full":
        _fired(fault)
        raise OSError(28, "No space left on device")
    REAL_SAVE(tensors, path, metadata=metadata)
    if fault is not None and fault["action"] == "half":
        data = Path(path).read_bytes()
        Path(path).write_bytes(data[:len(data) // 2])
        _fired(fault)
        _wait_forever()


if os.environ.get("RANK") == "0":
    checkpointing._stage = stage
    checkpoint.save_file = save_file
sys.exit(main(["unimed", "train", *sys.argv[1:]]))
