"""The options of every Hugging Face ``from_pretrained`` call cmoe makes on a local directory."""

from __future__ import annotations

from typing import Any

import torch


def local_load_options() -> dict[str, Any]:
    """Local files only; inside a meta device context (the recipe's `model.memory.build_on_meta`) the same model
    with its weights left on meta (transformers refuses from_pretrained there unless told the target); and no Hub
    kernels: transformers >= 5.25 turns them on by default, fetches them from the Hub (cmoe never reaches it at
    run time) and fails on the meta device ("Unsupported device type 'meta'")."""
    return {"local_files_only": True, "use_kernels": False,
            "device_map": "meta" if torch.empty(()).is_meta else None}
