"""The tug-of-war measurements over training as one JSON report: `TugOfWarStep` (one analysed step) and
`TugOfWarReport` (every step, plus free-form ``meta``), written atomically and read back."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cmoe.errors import expect
from cmoe.io import write_json
from cmoe.reference_models.unimed.analysis.measures import (
    DirectionIndex,
    GradientAnalysis,
    Histogram,
    MagnitudeIndex,
    ParameterStats,
    TaskRouting,
    analyze_gradients,
)

REPORT_JSON = "tug_of_war.json"

__all__ = ["REPORT_JSON", "TugOfWarReport", "TugOfWarStep"]


def _clean(value: Any) -> Any:
    """JSON-safe copy: dataclasses → dicts, non-finite floats → None (null = undefined), tensors → lists."""
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if hasattr(value, "__dataclass_fields__"):
        return {k: _clean(getattr(value, k)) for k in value.__dataclass_fields__}
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (np.floating, np.integer)):
        return _clean(value.item())
    return value


def _num(value: Any) -> float:
    return math.nan if value is None else float(value)


def _hist(data: Mapping[str, Any] | None) -> Histogram | None:
    return None if data is None else Histogram(list(map(float, data["edges"])), list(map(int, data["counts"])))


@dataclass
class TugOfWarStep:
    """Everything measured at one training step: `GradientAnalysis` per parameter group, `TaskRouting` per
    task and `ParameterStats` per group (the last two optional)."""

    step: int
    gradients: dict[str, GradientAnalysis] = field(default_factory=dict)
    routing: dict[str, TaskRouting] = field(default_factory=dict)
    parameters: dict[str, ParameterStats] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TugOfWarStep:
        gradients = {}
        for group, g in data.get("gradients", {}).items():
            d, m = g["direction"], g["magnitude"]
            gradients[group] = GradientAnalysis(
                tasks=list(g["tasks"]), cosine=[[_num(v) for v in row] for row in g["cosine"]],
                norms={k: _num(v) for k, v in g["norms"].items()}, zero_norm_tasks=list(g["zero_norm_tasks"]),
                direction=DirectionIndex(_num(d["conflict"]), _num(d["conflict_fraction"]),
                                         _num(d["mean_cosine"]), _num(d["min_cosine"]), int(d["num_pairs"])),
                magnitude=MagnitudeIndex(*(_num(m[k]) for k in ("cv", "max_min_ratio", "mean_norm", "std_norm",
                                                                  "min_norm", "max_norm"))),
            )
        routing = {task: TaskRouting([_num(v) for v in r["mean_weight"]], _num(r["entropy"]),
                                     _num(r["normalized_entropy"]), int(r["num_tokens"]))
                   for task, r in data.get("routing", {}).items()}
        parameters = {}
        for group, p in data.get("parameters", {}).items():
            parameters[group] = ParameterStats(
                int(p["numel"]), _num(p["norm"]), _num(p["mean"]), _num(p["std"]), _num(p["min"]), _num(p["max"]),
                _hist(p["histogram"]),
                None if p.get("update_histogram") is None else _num(p.get("update_norm")),
                None if p.get("update_histogram") is None else _num(p.get("relative_update")),
                _hist(p.get("update_histogram")),
            )
        return cls(int(data["step"]), gradients, routing, parameters)


@dataclass
class TugOfWarReport:
    """The tug-of-war measurements over training, one `TugOfWarStep` per analysed step, plus free-form
    ``meta`` (connector type, experts, tasks, ...). ``to_dict`` is plain JSON (``null`` = undefined)."""

    steps: list[TugOfWarStep] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def record(self, step: int, task_grads: Mapping[str, Mapping[str, torch.Tensor]],
               routing: Mapping[str, TaskRouting] | None = None,
               parameters: Mapping[str, ParameterStats] | None = None, eps: float = 1e-12) -> TugOfWarStep:
        """Analyse ``{task: {group: flat gradient}}`` (as `flat_group_gradients` after each task's backward,
        or `per_task_group_gradients`) for every group, and append the step with optional routing and
        parameter statistics."""
        expect(len(task_grads) > 0, "task_grads", "a non-empty {task: {group: gradient}} mapping", {})
        group_names = list(dict.fromkeys(g for per_group in task_grads.values() for g in per_group))
        gradients = {}
        for group in group_names:
            missing = [t for t, per_group in task_grads.items() if group not in per_group]
            expect(not missing, "task_grads", f"group {group!r} for every task", f"missing for {missing}")
            gradients[group] = analyze_gradients({t: per_group[group] for t, per_group in task_grads.items()}, eps)
        entry = TugOfWarStep(int(step), gradients, dict(routing or {}), dict(parameters or {}))
        self.steps.append(entry)
        return entry

    def to_dict(self) -> dict[str, Any]:
        return {"format": "cmoe.tug_of_war/1", "meta": _clean(self.meta), "steps": [_clean(s) for s in self.steps]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TugOfWarReport:
        return cls([TugOfWarStep.from_dict(s) for s in data.get("steps", [])], dict(data.get("meta", {})))

    def save_json(self, path: str | os.PathLike) -> Path:
        """Write `to_dict` to `path` atomically (temp file + rename)."""
        return write_json(path, self.to_dict())

    @classmethod
    def load_json(cls, path: str | os.PathLike) -> TugOfWarReport:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def index_curves(self, index: str = "direction") -> dict[str, tuple[list[int], list[float]]]:
        """``{group: (steps, values)}`` of the direction (``conflict``) or magnitude (``cv``) index."""
        expect(index in ("direction", "magnitude"), "index", "'direction' or 'magnitude'", repr(index))
        curves: dict[str, tuple[list[int], list[float]]] = {}
        for entry in self.steps:
            for group, analysis in entry.gradients.items():
                value = analysis.direction.conflict if index == "direction" else analysis.magnitude.cv
                steps, values = curves.setdefault(group, ([], []))
                steps.append(entry.step)
                values.append(value)
        return curves

