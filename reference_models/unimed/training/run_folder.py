"""The run folder every rank of a training run shares: who writes what, and what every rank must agree on.

Rank 0 writes everything in the run folder (checkpoints with every rank's RNG state, ``latest``, ``metrics.jsonl``,
``config.json``, ``connector_init.safetensors``, the tug-of-war report); the other ranks only read it. So that
ranks on different hosts resume alike, `open_run_folder` (every rank, at start, before anything is read) has:

1. rank 0 clean the folder as its owner (`clean_run_folder`: only leftovers of dead writers of its own host);
2. every rank check that it sees what rank 0 wrote there (one shared folder, at the same path on every node): a
   node-local folder would leave the other nodes without the checkpoints they must resume from;
3. rank 0 choose the checkpoint to resume from and tell the others, so no rank takes another one (an NFS client
   with a stale view of ``latest``, a checkpoint renamed into place between two ranks' looks).
"""

from __future__ import annotations

import secrets
import socket
from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist

from cmoe.errors import CMoEError
from cmoe.leftovers import temporary_path
from cmoe.reference_models.unimed.model.checkpoint import clean_run_folder

PROBE = "shared-folder-check"


def _broadcast(value: object) -> object:
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _gather(value: object, world_size: int) -> list:
    gathered: list = [None] * world_size
    dist.all_gather_object(gathered, value)
    return gathered


def unshared_message(output_dir: Path, seen: list[tuple[int, str, bool]]) -> str | None:
    """The error for ranks that did not see rank 0's probe file in `output_dir` (``(rank, host, seen)`` per rank),
    or None when every rank saw it."""
    blind = [(rank, host) for rank, host, ok in seen if not ok]
    if not blind:
        return None
    writer = next((host for rank, host, _ in seen if rank == 0), "?")
    names = ", ".join(f"rank {rank} on {host}" for rank, host in blind[:4]) + (" and more" if len(blind) > 4 else "")
    return (f"output_dir {output_dir}: {names} cannot see what rank 0 (on {writer}) wrote there; every rank must see "
            "one shared folder (NFS, Lustre) at the same path, since rank 0 writes every checkpoint and all ranks "
            "resume from it: mount the shared folder on every node, or pass an --output-dir on shared storage (a "
            "node-local folder works only when every process runs on one node)")


def check_shared(output_dir: Path, rank: int, world_size: int) -> None:
    """Raise `CMoEError` on every rank unless every rank reads the file rank 0 writes into `output_dir` now.
    A collective: every rank calls it."""
    probe, payload = None, None
    if rank == 0:
        probe = temporary_path(output_dir / PROBE)  # a leftover's name: a kill here leaves nothing unexplained
        token = secrets.token_hex(16)
        try:
            probe.write_text(token)
            payload = (probe.name, token)
        except OSError as error:
            payload = (None, f"output_dir {output_dir}: rank 0 cannot write there ({error}); pass a writable "
                             "--output-dir on storage every node shares")
    name, token = _broadcast(payload)
    if name is None:
        raise CMoEError(token)
    try:
        seen = (output_dir / name).read_text() == token
    except OSError:
        seen = False
    gathered = _gather((rank, socket.gethostname(), seen), world_size)
    if probe is not None:
        probe.unlink(missing_ok=True)
    message = unshared_message(output_dir, gathered)
    if message:
        raise CMoEError(message)


def agree(choose: Callable[[], Path | None], rank: int, world_size: int) -> Path | None:
    """Rank 0's ``choose()``, on every rank; an error it raises is raised on every rank. A collective."""
    if world_size == 1:
        return choose()
    choice, error = None, None
    if rank == 0:
        try:
            choice = choose()
        except CMoEError as raised:
            error = raised
    name, message = _broadcast((None if choice is None else str(choice), None if error is None else str(error)))
    if error is not None:
        raise error
    if message is not None:
        raise CMoEError(message)
    return None if name is None else Path(name)


def open_run_folder(output_dir: Path, rank: int, world_size: int,
                    choose: Callable[[], Path | None]) -> Path | None:
    """Clean (rank 0), check that every rank shares the folder, and return the checkpoint rank 0 chooses to
    resume from (`choose`), on every rank. Call it on every rank before reading the folder."""
    if rank == 0:
        clean_run_folder(output_dir)
    if world_size > 1:
        if rank == 0:
            output_dir.mkdir(parents=True, exist_ok=True)
        check_shared(output_dir, rank, world_size)
    return agree(choose, rank, world_size)
