"""JSON and safetensors files written atomically (through `cmoe.checkpointing.atomic_write`, the project's one
atomic writer), and safetensors read with errors that name the file."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from cmoe.checkpointing import atomic_write
from cmoe.errors import CMoEError

__all__ = ["atomic_write", "load_tensors", "save_tensors", "write_json"]


def write_json(path: str | os.PathLike, data: dict) -> Path:
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    """Write `tensors` as safetensors, atomically."""
    tensors = {name: t.detach().contiguous() for name, t in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def load_tensors(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read a safetensors file; a missing, truncated or garbled one raises `CMoEError` naming it."""
    if not Path(path).is_file():
        raise CMoEError(f"{path}: missing; save the model again or pass the directory that holds it")
    try:
        return load_file(str(path), device=str(device))
    except Exception as error:  # safetensors raises its own SafetensorError, or OSError / ValueError
        raise CMoEError(f"{path}: not a readable safetensors file ({type(error).__name__}: {error}); it is "
                        "truncated or damaged: save it again or restore it from a backup") from None
