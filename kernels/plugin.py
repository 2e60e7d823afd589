"""Registers the ``triton`` and ``grouped_mm`` backends (entry point ``cmoe`` → ``triton_kernels``) without
importing triton.

triton itself is imported on the first call that runs the kernels, so ``cmoe plugins list`` and CPU users pay
nothing for it; on a device where the kernels cannot run, `Backend.unavailable_reason` says why.
"""

from __future__ import annotations

import torch

from cmoe.dispatch import Backend
from cmoe.experts import StackedExperts
from cmoe.hookspecs import Register, hookimpl
from cmoe.kernels import grouped_mm
from cmoe.kernels.availability import is_available, unavailable_reason


def triton_backend(x: torch.Tensor, experts: StackedExperts, index: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Fused gather → grouped GEMM → scatter kernels (dense routing: one wide GEMM)."""
    from cmoe.kernels.ops import triton_moe_project

    return triton_moe_project(x, experts, index, weight)


@hookimpl
def cmoe_register_backends(register: Register) -> None:
    register("triton", Backend("triton", triton_backend, is_available=is_available,
                               description="fused Triton gather/grouped-GEMM/scatter kernels (CUDA)",
                               unavailable_reason=unavailable_reason,
                               auto_candidate=lambda device: device.type == "cuda"))
    register("grouped_mm", Backend("grouped_mm", grouped_mm.grouped_mm_backend, is_available=grouped_mm.is_available,
                                   description="one torch grouped_mm per expert layer over expert-sorted rows",
                                   unavailable_reason=grouped_mm.unavailable_reason,
                                   input_problem=grouped_mm.input_problem))
