"""Checkpoints that lose nothing: trainable weights, optimiser, scheduler, RNG and data position.

A checkpoint is a directory ``step_00001000/`` written by `cmoe.checkpointing.atomic_directory` (a temporary
name renamed into place, with a SHA-256 of every file in ``checksums.json``), so a crash leaves either the whole
checkpoint or none; ``latest`` (also written atomically) names the newest. `find_latest` verifies the checkpoint
before it is used and falls back, with a log line, to the newest good one when ``latest`` is missing, garbage,
names a deleted folder or a damaged checkpoint. Reading changes nothing (an evaluation job on another host may
read while a run writes); `clean_run_folder` is the owner's (the training run's rank 0, at start).
Tensors go to safetensors (``trainable.safetensors``, ``optimizer.safetensors``, ``rng.safetensors``); the
rest (step, scheduler, Python/NumPy RNG, optimiser hyper-parameters, config) to ``state.json``. As in the
original, only trainable parameters (connector, LoRA) are saved; the frozen weights come from the config, and a
fingerprint of them is checked on load so a checkpoint is never applied to a different base model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from cmoe import checkpointing, leftovers
from cmoe.checkpointing import CheckpointError, atomic_directory, verify_directory
from cmoe.errors import CMoEError
from cmoe.io import atomic_write, load_tensors, save_tensors

logger = logging.getLogger("cmoe.unimed.checkpoint")
T = TypeVar("T")

LATEST = "latest"
PREFIX = "step_"
REQUIRED = ("trainable.safetensors", "state.json")
CONNECTOR_INIT = "connector_init.safetensors"


def frozen_fingerprint(model: nn.Module) -> str:
    """A short hash of the frozen parameters' names, shapes and first values: cheap even for a 7B model."""
    digest = hashlib.sha1()
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            continue
        head = parameter.detach().reshape(-1)[:8].float().cpu().numpy()
        digest.update(f"{name}{tuple(parameter.shape)}".encode())
        digest.update(np.round(head, 5).tobytes())
    return digest.hexdigest()[:16]


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, plain = {}, {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                plain.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "plain": plain}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    for index, values in meta["plain"].items():
        state.setdefault(int(index), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Every RNG the training loop touches: torch (CPU and each CUDA device), Python, NumPy's global one."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{index}"] = state
    version, values, gauss = random.getstate()
    np_state = np.random.get_state()
    plain = {"python": [version, list(values), gauss],
             "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}
    return tensors, plain


def set_rng_state(tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[key] for key in sorted(k for k in tensors if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[:torch.cuda.device_count()])
    version, values, gauss = plain["python"]
    random.setstate((version, tuple(values), gauss))
    name, keys, *rest = plain["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))


def save_checkpoint(output_dir: str | os.PathLike, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, extra: dict[str, Any], keep: int | None = None, tokenizer: Any = None,
                    rng_states: list[tuple[dict[str, torch.Tensor], dict[str, Any]]] | None = None,
                    trainable: dict[str, torch.Tensor] | None = None, optimizer_state: dict[str, Any] | None = None,
                    fingerprint: str | None = None) -> Path:
    """Write ``output_dir/step_<step>/`` atomically, point ``latest`` at it, and keep the newest `keep`.

    `rng_states` holds one `rng_state()` per rank (default: this process's), so every rank resumes its own.
    A sharded (FSDP) run passes the gathered `trainable` weights, `optimizer_state` and the `fingerprint`
    taken before sharding; otherwise they are read from `model` and `optimizer`."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    final = output_dir / f"{PREFIX}{step:08d}"
    if trainable is None:
        trainable = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    opt_tensors, opt_meta = _flatten_optimizer(optimizer_state if optimizer_state is not None
                                               else optimizer.state_dict())
    rng_states = rng_states or [rng_state()]
    state = {"step": step, "optimizer": opt_meta, "scheduler": scheduler.state_dict(),
             "rng": [plain for _, plain in rng_states],
             "frozen_fingerprint": fingerprint or frozen_fingerprint(model), **extra}
    with atomic_directory(final, keep_existing_files=False) as tmp:
        save_file({n: t.detach().cpu().contiguous() for n, t in trainable.items()}, str(tmp / "trainable.safetensors"))
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        save_file({f"rank{rank}.{key}": value for rank, (tensors, _) in enumerate(rng_states)
                   for key, value in tensors.items()}, str(tmp / "rng.safetensors"))
        (tmp / "state.json").write_text(json.dumps(state, indent=1, default=_json_default))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp / "tokenizer"))
    checkpointing._stage("checkpoint-before-latest")
    atomic_write(output_dir / LATEST, lambda path: Path(path).write_text(final.name + "\n"))
    if keep is not None:
        prune_checkpoints(output_dir, keep, step)
    return final


def save_connector_init(output_dir: str | os.PathLike, connector: nn.Module) -> Path:
    """Write the connector's parameters before the first step to ``output_dir/connector_init.safetensors``
    (atomically), so the tug-of-war analysis of a later checkpoint can measure updates since initialisation
    without rebuilding the model."""
    return save_tensors(Path(output_dir) / CONNECTOR_INIT,
                        {name: p.detach().cpu() for name, p in connector.named_parameters()})


def load_connector_init(output_dir: str | os.PathLike) -> dict[str, torch.Tensor] | None:
    """The parameters `save_connector_init` wrote for the run in `output_dir`, or None if it wrote none."""
    path = Path(output_dir) / CONNECTOR_INIT
    return load_tensors(path) if path.is_file() else None


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, directory)`` of every ``step_<N>`` folder in `output_dir`, sorted by step number (not by name)."""
    found = []
    for path in Path(output_dir).glob(f"{PREFIX}*"):
        match = re.fullmatch(rf"{PREFIX}(\d+)", path.name)
        if match and path.is_dir():
            found.append((int(match[1]), path))
    return sorted(found)


def prune_checkpoints(output_dir: str | os.PathLike, keep: int, current: int) -> None:
    """Keep the checkpoint of step `current` and the newest ``keep - 1`` older ones; never touch a newer one
    (it belongs to a run resumed from an earlier step, and deleting it could lose the only copy)."""
    older = [path for step, path in list_checkpoints(output_dir) if step < current]
    for path in older[:max(0, len(older) - (keep - 1))]:
        shutil.rmtree(path, ignore_errors=True)


def latest_pointer(output_dir: Path) -> Path | None:
    """The folder ``latest`` names, or None (with a log line) when it is missing, garbage or dangling."""
    pointer = output_dir / LATEST
    if not pointer.is_file():
        return None
    try:
        name = pointer.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        name = ""
    if re.fullmatch(rf"{PREFIX}\d+", name) and (output_dir / name).is_dir():
        return output_dir / name
    logger.warning("%s names %r, which is not a checkpoint folder here; looking for the newest good checkpoint",
                   pointer, name[:80])
    return None


def clean_command(output_dir: str | os.PathLike) -> str:
    """The command that removes the leftovers of interrupted saves in a run folder."""
    return f"cmoe unimed clean {output_dir}"


def clean_run_folder(output_dir: str | os.PathLike) -> leftovers.Cleaned:
    """What the owner of a run folder (its training run's rank 0, when it starts) does before anything else:
    put back checkpoints that a dead writer of this host moved aside, remove that writer's temporaries (anywhere
    in the run folder), and report the others with the command that removes them."""
    return leftovers.clean(output_dir, command=clean_command(output_dir), recursive=True)


def find_latest(output_dir: str | os.PathLike, verify: bool = True) -> Path | None:
    """The checkpoint to continue from in `output_dir`, or None when it holds no ``step_*`` folder.

    That is the one ``latest`` names; when ``latest`` is missing, garbage or dangling, or (with `verify`) the
    checkpoint it names is incomplete or damaged, the newest checkpoint (by step) that verifies, with a log line.
    Raises `CheckpointError` when checkpoints exist but none verifies. Reads only: temporaries of saves in
    progress or interrupted are skipped and named in a log line (`cmoe.leftovers.note`), never removed; the
    training run's rank 0 removes its own host's dead ones when it starts (`clean_run_folder`)."""
    output_dir = Path(output_dir)
    leftovers.note(output_dir, clean_command(output_dir))
    named = latest_pointer(output_dir)
    candidates = [path for _, path in reversed(list_checkpoints(output_dir))]
    if named is not None:
        candidates = [named] + [path for path in candidates if path != named]
    problems = []
    for path in candidates:
        if not verify:
            return path
        try:
            verify_directory(path, required=REQUIRED)
        except CheckpointError as error:
            problems.append(str(error))
            logger.warning("checkpoint %s is not usable (%s); trying the previous one", path, error)
            continue
        if path != named:
            logger.warning("using %s, the newest good checkpoint in %s", path.name, output_dir)
        return path
    if problems:
        raise CheckpointError(f"{output_dir}: none of its {len(problems)} checkpoint(s) is usable: {problems[0]}; "
                              "restore one from a backup, or start a new run in another --output-dir")
    return None


def read_latest(output_dir: str | os.PathLike, read: Callable[[Path], T], attempts: int = 3) -> tuple[Path, T]:
    """``(checkpoint, read(checkpoint))`` for the run's latest checkpoint (`find_latest`). The training run may
    prune that checkpoint while another process reads it (it keeps ``train.keep_checkpoints``): when reading fails
    and ``latest`` has moved on meanwhile, the new latest is read, with a log line. A `CMoEError` when the folder
    holds no checkpoint."""
    output_dir = Path(output_dir)
    for _ in range(attempts - 1):
        path = _latest_checkpoint(output_dir)
        try:
            return path, read(path)
        except (OSError, CMoEError) as error:
            moved_on = find_latest(output_dir, verify=False)
            if moved_on is None or moved_on == path:
                raise
            logger.warning("%s went away while it was read (%s: the training run keeps only its newest "
                           "checkpoints); reading %s, the new latest", path.name, type(error).__name__, moved_on.name)
    path = _latest_checkpoint(output_dir)
    return path, read(path)


def _latest_checkpoint(output_dir: str | os.PathLike) -> Path:
    """`find_latest`, or a `CMoEError` saying what to do when the folder holds no checkpoint."""
    output_dir = Path(output_dir)
    path = find_latest(output_dir)
    if path is None:
        raise CMoEError(f"{output_dir}: no checkpoint in this folder; train first (cmoe unimed train) or pass "
                        "--checkpoint DIR")
    return path


def checkpoint_step(path: str | os.PathLike) -> int | None:
    """The step in a checkpoint's ``state.json``, read alone (no tensors, no checksums); None when it cannot be
    read (`read_checkpoint` then says why)."""
    try:
        state = json.loads((Path(path) / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    step = state.get("step") if isinstance(state, dict) else None
    return step if isinstance(step, int) else None


RESUME_KEPT = "the weights, optimiser, schedule, RNG state and step"
"""What a resumed run takes from its checkpoint, whatever the config says now."""


def _differences(old: Any, new: Any, where: str) -> list[tuple[str, Any, Any]]:
    """``(key path, old value, new value)`` for every leaf that differs between two config mappings."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [change for key in sorted(set(old) | set(new), key=str)
                for change in _differences(old.get(key), new.get(key), f"{where}.{key}")]
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [change for index, (a, b) in enumerate(zip(old, new))
                for change in _differences(a, b, f"{where}[{index}]")]
    return [] if old == new else [(where, old, new)]


def resume_note(state: dict[str, Any], config: dict[str, Any], path: str | os.PathLike, shown: int = 4) -> str | None:
    """One line for a run resumed from the checkpoint at `path` (its ``state.json`` is `state`) whose current
    config (`config`, `RecipeConfig.to_dict`) has a ``seed`` or ``data`` section other than the one the checkpoint
    was written with: what changed (the first `shown` data keys) and what the run keeps. None when nothing changed
    or the checkpoint holds no config."""
    saved = state.get("config")
    if not isinstance(saved, dict):
        return None
    config = json.loads(json.dumps(config, default=str))  # as the checkpoint stored it: tuples as lists
    seed = _differences(saved.get("seed"), config.get("seed"), "seed")
    data = _differences(saved.get("data"), config.get("data"), "data")
    if not seed and not data:
        return None
    changed = []
    if seed:
        changed.append(f"seed {seed[0][1]} → {seed[0][2]}")
    changed += [f"{key} {old!r} → {new!r}" for key, old, new in data[:shown]]
    if len(data) > shown:
        changed.append(f"and {len(data) - shown} more data key(s)")
    follows = " and ".join(part for part, diff in (("seed", seed), ("data", data)) if diff)
    return (f"resuming from {Path(path).name} (step {state.get('step')}) with {'a ' if seed else ''}changed {follows} "
            f"({'; '.join(changed)}): kept from the checkpoint: {RESUME_KEPT}; the new {follows} choose the "
            "batches from here on, so the run differs from one that never stopped (start a new --output-dir to "
            "train from scratch with them)")


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The parts of a checkpoint directory: ``trainable``, ``optimizer``, ``rng`` tensors and ``state``, after
    checking every file against the checksums recorded when it was written."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path}: no such directory; expected a directory written by "
                              "`cmoe unimed train` (step_XXXXXXXX/ with trainable.safetensors and state.json)")
    verify_directory(path, required=REQUIRED)
    try:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path / 'state.json'}: not valid JSON ({error}); the checkpoint is damaged, use "
                              "another one") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CheckpointError(f"{path / 'state.json'}: expected a JSON object with an int 'step'; the checkpoint "
                              "is damaged, use another one")
    parts = {"trainable": load_tensors(path / "trainable.safetensors"), "state": state, "path": path}
    for name in ("optimizer", "rng"):
        file = path / f"{name}.safetensors"
        parts[name] = load_tensors(file) if file.is_file() else None
    return parts


def load_trainable(model: nn.Module, parts: dict[str, Any], where: str = "checkpoint") -> None:
    """Copy the saved trainable parameters into `model`, after checking names, shapes and the frozen base."""
    expected = frozen_fingerprint(model)
    saved = parts["state"].get("frozen_fingerprint")
    if saved is not None and saved != expected:
        raise CMoEError(f"{where}: the frozen weights differ from those the checkpoint was trained with "
                        f"(fingerprint {saved} vs {expected}); use the same base model paths and seed as its run")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    unknown = sorted(set(parts["trainable"]) - set(params))
    absent = sorted(set(params) - set(parts["trainable"]))
    if unknown or absent:
        raise CMoEError(f"{where}: parameters do not match the model: unexpected {unknown[:5]}, missing "
                        f"{absent[:5]}; was it written for another connector preset or LoRA setting?")
    with torch.no_grad():
        for name, value in parts["trainable"].items():
            if params[name].shape != value.shape:
                raise CMoEError(f"{where}: parameter {name}: expected shape {tuple(params[name].shape)}, got "
                                f"{tuple(value.shape)}")
            params[name].copy_(value)


def load_training_state(parts: dict[str, Any], optimizer: torch.optim.Optimizer, scheduler: Any,
                        rank: int = 0, load_optimizer: Callable[[dict[str, Any]], Any] | None = None) -> dict[str, Any]:
    """Restore optimiser (through `load_optimizer` for a sharded model), scheduler and this rank's RNG from a
    checkpoint's parts; returns its ``state``."""
    state = parts["state"]
    where = parts.get("path", "checkpoint")
    for name in ("optimizer", "rng"):
        if parts.get(name) is None:
            raise CheckpointError(f"{where}/{name}.safetensors: missing, so training cannot continue exactly; "
                                  "resume from another checkpoint, or evaluate this one (it needs only the weights)")
    missing = [key for key in ("optimizer", "scheduler", "rng") if key not in state]
    if missing:
        raise CheckpointError(f"{where}/state.json: lacks {missing}; the checkpoint is damaged, use another one")
    (load_optimizer or optimizer.load_state_dict)(_unflatten_optimizer(parts["optimizer"], state["optimizer"]))
    scheduler.load_state_dict(state["scheduler"])
    if rank >= len(state["rng"]):
        raise CMoEError(f"checkpoint: written by {len(state['rng'])} process(es), resumed with rank {rank}; "
                        "resume with the same number of processes for an exact continuation")
    prefix = f"rank{rank}."
    set_rng_state({k[len(prefix):]: v for k, v in parts["rng"].items() if k.startswith(prefix)}, state["rng"][rank])
    return state


