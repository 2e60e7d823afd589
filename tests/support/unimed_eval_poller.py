"""Run by tests/unimed/training/test_unimed_multinode.py on a third host while two nodes train: ``poller.py RUN OUT``. What
``cmoe unimed eval`` does first, in a loop until ``OUT/stop`` exists: `find_latest` (skips temporaries, falls
back past damaged checkpoints), then `read_checkpoint` (every file checked against the checksums written with
it). One JSON line per look goes to ``OUT/looks.jsonl``: the checkpoint read and a hash of its weights, or the
error; ``OUT/count`` holds the number of looks, so the test can wait for looks made while a save is paused. Log
lines (what was skipped, and why) go to stderr."""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import time
from pathlib import Path

import torch

from cmoe.errors import CMoEError
from cmoe.reference_models.unimed.model.checkpoint import find_latest, read_checkpoint


def weights_hash(tensors: dict) -> str:
    """SHA-256 of every tensor's name and bytes."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def look(run: Path) -> dict:
    try:
        path = find_latest(run)
        if path is None:
            return {"checkpoint": None}
        parts = read_checkpoint(path)
        return {"checkpoint": path.name, "step": parts["state"]["step"], "weights": weights_hash(parts["trainable"])}
    except CMoEError as error:
        return {"error": str(error)}


def main(run: Path, out: Path) -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
    count = 0
    with open(out / "looks.jsonl", "a") as looks:
        while not (out / "stop").exists():
            record = look(run)
            record["temporaries"] = sorted(p.name for p in run.glob(".*")) if run.is_dir() else []
            looks.write(json.dumps(record) + "\n")
            looks.flush()
            count += 1
            (out / "count").write_text(str(count))
            time.sleep(0.05)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
