"""Whether the ``triton`` backend can run on a device, and if not, why (without importing triton)."""

from __future__ import annotations

import importlib.util
import os
import sys

import torch


def interpreting() -> bool:
    """``TRITON_INTERPRET=1``: triton runs kernels in its (slow) CPU interpreter on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes")


# Looked up once at import: `torch.compile` cannot trace `importlib.util.find_spec` (dynamo skips it), and
# backend selection asks on every call.
TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def unavailable_reason(device: torch.device | str) -> str | None:
    """None when the fused kernels can run on `device`; otherwise what is missing and how to get it."""
    device = torch.device(device)
    if not TRITON_INSTALLED:
        return "the `triton` package is not installed (pip install 'cmoe[triton]', Linux only)"
    if device.type == "cuda":
        return None
    compiled = sys.modules.get("cmoe.kernels.triton_kernels")
    if device.type == "cpu" and compiled is not None and not compiled.INTERPRETED:
        return ("the fused kernels were already loaded compiled for CUDA (TRITON_INTERPRET was not set when "
                "cmoe.kernels first ran); set TRITON_INTERPRET=1 before the first use to run them on CPU")
    if device.type == "cpu" and (interpreting() or compiled is not None):
        return None
    if device.type == "cpu":
        return ("the fused kernels need a CUDA GPU; on CPU they run only in triton's interpreter, enabled by "
                "setting TRITON_INTERPRET=1 before cmoe.kernels is first used (slow: for tests at small shapes). "
                "backend='auto' does not time it on CPU")
    return f"the fused kernels run on CUDA devices only, not {device.type}"


def is_available(device: torch.device | str) -> bool:
    return unavailable_reason(device) is None
