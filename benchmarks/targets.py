"""The targets the issues set for the dispatch backends, which the runner's summary reports each measurement
against (``python -m cmoe.benchmarks.run``; the results files' read-first notes say which were met)."""

from __future__ import annotations

from cmoe.benchmarks.cases import TORCH_GROUPED_MM

TRITON_ROOFLINE_FRACTION = 0.85
"""`triton`'s time should be at most 1 / 0.85 of the same-FLOPs dense matmul's (roofline time ÷ triton time ≥)."""

TRITON_SPEEDUP_TARGETS: dict[str, float] = {"sorted": 1.2, "grouped_mm": 1.2, "hf_grouped_mm": 1.5}
"""`triton`'s speed-up (the other's time ÷ triton's) at least this over each of these implementations."""

TRITON_COMPARED_WITH: tuple[str, ...] = (*TRITON_SPEEDUP_TARGETS, TORCH_GROUPED_MM, "hf_eager")
"""Every implementation `triton` is compared with in the summary, in order; those without a target are shown
for reference."""

AUTO_PICK_WITHIN = 1.05
"""`auto`'s pick should take at most this many times the fastest pickable backend's time."""

__all__ = ["AUTO_PICK_WITHIN", "TRITON_COMPARED_WITH", "TRITON_ROOFLINE_FRACTION", "TRITON_SPEEDUP_TARGETS"]
