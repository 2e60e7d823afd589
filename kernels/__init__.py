"""cmoe.kernels — fused Triton kernels for token-level expert dispatch (the ``triton`` backend).

The plugin entry point ``triton_kernels`` registers backend ``triton`` (``backend="triton"``; ``auto`` does not
pick it while it measures slower than ``sorted`` in forward+backward, see docs/kernels.md).
Importing this package does not import triton: `cmoe.kernels.ops` does, on first use.

* `align` — token-parallel, sync-free sort of the (token, slot) pairs by expert, padded per expert to BLOCK_M;
* `triton_moe_project` — forward and backward through the fused kernels (``torch.ops.cmoe.triton_moe_forward``,
  a custom op with a registered backward, so autograd and ``torch.compile`` see one op);
* `pin_config` / ``CMOE_TRITON_CONFIG`` / ``CMOE_TRITON_AUTOTUNE=0`` — fix the block configuration
  (see `cmoe.kernels.tuning`).

On CPU the kernels run only in triton's interpreter (``TRITON_INTERPRET=1`` set before first use), which the
tests use at small shapes.
"""

from __future__ import annotations

from typing import Any

if __name__ == "cmoe.kernels":
    from cmoe.kernels.availability import interpreting, is_available, unavailable_reason
    from cmoe.kernels.tuning import KernelConfig, clear_cache, pin_config
else:  # found as a bare `kernels` (repository root on sys.path) before Hugging Face's: cmoe/source_folders.py
    import runpy

    runpy.run_path(f"{__path__[0]}/../cmoe/source_folders.py")["hand_over"](__name__)

__all__ = ["KernelConfig", "align", "clear_cache", "interpreting", "is_available", "pin_config",
           "triton_moe_project", "unavailable_reason"]


def __getattr__(name: str) -> Any:
    if name in ("align", "triton_moe_project"):
        from cmoe.kernels import ops

        return getattr(ops, name)
    raise AttributeError(f"module 'cmoe.kernels' has no attribute {name!r}")
