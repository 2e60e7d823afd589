"""The multi-task "tug-of-war" at the connector, measured (Uni-Med, arXiv 2409.17508, §"tug-of-war").

Uni-Med argues that tasks sharing one connector pull its parameters in different directions and with
different strengths, and that the Connector-MoE eases this. The paper gives no formulas, so this module fixes
standard ones (each function's docstring states its formula and source):

* **direction** — pairwise cosine similarity of the tasks' gradients on a parameter group, summarised by the
  *conflict index* ``mean_{i<j} max(0, −cos_ij)`` (a gradient pair "conflicts" when its cosine is negative,
  as in PCGrad: Yu et al., "Gradient Surgery for Multi-Task Learning", NeurIPS 2020);
* **magnitude** — imbalance of the tasks' gradient norms, summarised by their *coefficient of variation*
  ``std/mean`` (the max/min ratio is reported too), motivated by GradNorm (Chen et al., "GradNorm: Gradient
  Normalization for Adaptive Loss Balancing in Deep Multitask Networks", ICML 2018);
* **parameters** — per-expert (and router) weight statistics and update sizes between two snapshots;
* **routing** — each task's mean routing weight per expert and the entropy of that distribution.

Everything is computed per *parameter group*: one group per expert (a slice along dim 0 of the stacked
``[E, ...]`` expert weights), one for the router and one for the whole connector (``"all"``); an MLP
connector has only ``"projector"`` and ``"all"``. `TugOfWarReport` collects the numbers step by step, saves
them as JSON, and `write_report` renders the plots (matplotlib's non-interactive Agg canvas; matplotlib is
imported only when plotting).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from cmoe.errors import expect
from cmoe.io import atomic_write, write_json
from cmoe.routers import RoutingResult

ALL = "all"
ROUTER = "router"
PROJECTOR = "projector"
EXPERT_PREFIX = "expert_"
REPORT_JSON = "tug_of_war.json"
_GRAM_CHUNK = 1 << 22  # columns per float64 block when forming the task Gram matrix (bounds peak memory)

__all__ = [
    "ALL", "DirectionIndex", "GradientAnalysis", "GroupMember", "Histogram", "MagnitudeIndex", "PROJECTOR",
    "agg_figure", "save_png",
    "ParameterStats", "REPORT_JSON", "ROUTER", "TaskRouting", "TugOfWarReport", "TugOfWarStep",
    "analyze_gradients", "connector_parameter_groups", "cosine_matrix", "direction_index", "distribution_entropy",
    "flat_group_gradients", "flat_group_values", "magnitude_index", "magnitude_index_from_norms",
    "parameter_stats", "per_task_group_gradients", "plot_cosine_heatmap", "plot_index_curves",
    "plot_parameter_histograms", "plot_routing_bars", "routing_by_task", "snapshot_parameters",
    "write_report", "zero_norm_tasks",
]


# --------------------------------------------------------------------------------------------------------------
# Parameter groups
# --------------------------------------------------------------------------------------------------------------

class GroupMember(NamedTuple):
    """One parameter (by its ``named_parameters`` name) or, with `index`, its slice ``parameter[index]`` —
    how one expert's share of a stacked ``[E, ...]`` expert weight is named."""

    name: str
    parameter: nn.Parameter
    index: int | None = None

    def take(self, tensor: torch.Tensor) -> torch.Tensor:
        """The part of `tensor` (shaped like the parameter: its grad, a snapshot) this member covers."""
        return tensor if self.index is None else tensor[self.index]


def connector_parameter_groups(connector: nn.Module) -> dict[str, list[GroupMember]]:
    """Parameter groups of a connector, in order ``expert_0 … expert_{E-1}, router, all``.

    A connector with a stacked-experts module at ``.experts`` (it has ``num_experts``) gets one group per
    expert: every expert parameter whose dim 0 has size E, sliced at that expert. Expert parameters not
    stacked that way go to ``experts_shared``; the router's parameters to ``router`` (left out when the router
    has none, as the fixed ``hard_task`` / ``constant`` routers); anything else to ``other``. A connector
    without experts (`MLPConnector`) gets ``projector``. ``all`` always holds every parameter whole.
    """
    named = list(connector.named_parameters())
    expect(len(named) > 0, "connector", "a module with parameters", type(connector).__name__)
    experts = getattr(connector, "experts", None)
    num_experts = getattr(experts, "num_experts", None)
    groups: dict[str, list[GroupMember]] = {}
    if isinstance(experts, nn.Module) and isinstance(num_experts, int):
        for e in range(num_experts):
            groups[f"{EXPERT_PREFIX}{e}"] = []
        shared, router, other = [], [], []
        for name, param in named:
            if name.startswith("experts."):
                if param.dim() >= 1 and param.shape[0] == num_experts:
                    for e in range(num_experts):
                        groups[f"{EXPERT_PREFIX}{e}"].append(GroupMember(name, param, e))
                else:
                    shared.append(GroupMember(name, param))
            elif name.startswith("router."):
                router.append(GroupMember(name, param))
            else:
                other.append(GroupMember(name, param))
        for key, members in (("experts_shared", shared), (ROUTER, router), ("other", other)):
            if members:
                groups[key] = members
    else:
        groups[PROJECTOR] = [GroupMember(name, param) for name, param in named]
    groups[ALL] = [GroupMember(name, param) for name, param in named]
    return groups


def _flatten(members: Sequence[GroupMember], tensor_of: Mapping[str, torch.Tensor | None]) -> torch.Tensor:
    """Concatenate each member's part of ``tensor_of[name]`` as fp32 (zeros where it is None)."""
    parts = []
    for member in members:
        tensor = tensor_of.get(member.name)
        part = (torch.zeros_like(member.take(member.parameter), dtype=torch.float32) if tensor is None
                else member.take(tensor).detach().float())
        parts.append(part.reshape(-1))
    if not parts:
        return torch.zeros(0)
    return torch.cat(parts)


def flat_group_gradients(connector: nn.Module, groups: Mapping[str, Sequence[GroupMember]] | None = None
                         ) -> dict[str, torch.Tensor]:
    """Each group's current ``.grad`` as one flat fp32 vector (zeros where a grad is None). Call it after a
    task's ``backward()`` to get that task's gradients; ``groups`` defaults to `connector_parameter_groups`."""
    groups = connector_parameter_groups(connector) if groups is None else groups
    grads = {name: param.grad for name, param in connector.named_parameters()}
    return {key: _flatten(members, grads) for key, members in groups.items()}


def flat_group_values(connector: nn.Module, groups: Mapping[str, Sequence[GroupMember]] | None = None
                      ) -> dict[str, torch.Tensor]:
    """Each group's parameter values as one flat fp32 vector (what the weight histograms are made of)."""
    groups = connector_parameter_groups(connector) if groups is None else groups
    values = dict(connector.named_parameters())
    return {key: _flatten(members, values) for key, members in groups.items()}


def per_task_group_gradients(connector: nn.Module, task_losses: Mapping[str, torch.Tensor],
                             groups: Mapping[str, Sequence[GroupMember]] | None = None,
                             retain_graph: bool = True) -> dict[str, dict[str, torch.Tensor]]:
    """``{task: {group: flat fp32 gradient}}`` of each task's loss, by ``torch.autograd.grad`` — the ``.grad``
    fields are left untouched, so a training step can still call ``backward()`` on the total loss afterwards
    (keep ``retain_graph=True`` for that)."""
    expect(len(task_losses) > 0, "task_losses", "a non-empty {task: scalar loss} mapping", dict(task_losses))
    groups = connector_parameter_groups(connector) if groups is None else groups
    names = [name for name, param in connector.named_parameters() if param.requires_grad]
    params = [param for _, param in connector.named_parameters() if param.requires_grad]
    out: dict[str, dict[str, torch.Tensor]] = {}
    items = list(task_losses.items())
    for i, (task, loss) in enumerate(items):
        expect(isinstance(loss, torch.Tensor) and loss.dim() == 0, f"task_losses[{task!r}]", "a scalar tensor",
               getattr(loss, "shape", type(loss).__name__))
        grads = torch.autograd.grad(loss, params, retain_graph=retain_graph or i < len(items) - 1,
                                    allow_unused=True)
        by_name = dict(zip(names, grads))
        out[str(task)] = {key: _flatten(members, by_name) for key, members in groups.items()}
    return out


# --------------------------------------------------------------------------------------------------------------
# Direction and magnitude indexes
# --------------------------------------------------------------------------------------------------------------

def _stack(task_grads: Mapping[str, torch.Tensor]) -> tuple[list[str], torch.Tensor]:
    expect(len(task_grads) > 0, "task_grads", "a non-empty {task: gradient} mapping", dict(task_grads))
    tasks = [str(t) for t in task_grads]
    vectors = [g.detach().reshape(-1).float() for g in task_grads.values()]
    sizes = {v.numel() for v in vectors}
    expect(len(sizes) == 1, "task_grads", "gradients of one size (the same parameter group for every task)",
           f"sizes {[v.numel() for v in vectors]}")
    return tasks, torch.stack(vectors)


def _gram(matrix: torch.Tensor) -> torch.Tensor:
    """``G = X Xᵀ`` in float64, accumulated over column blocks so memory stays bounded for large groups."""
    gram = torch.zeros(matrix.shape[0], matrix.shape[0], dtype=torch.float64, device=matrix.device)
    for block in matrix.split(_GRAM_CHUNK, dim=1):
        block = block.double()
        gram += block @ block.T
    return gram.cpu()


def zero_norm_tasks(task_grads: Mapping[str, torch.Tensor], eps: float = 1e-12) -> list[str]:
    """Tasks whose gradient norm is ``<= eps``: their cosines are undefined (reported as 0)."""
    tasks, matrix = _stack(task_grads)
    norms = _gram(matrix).diagonal().clamp_min(0).sqrt()
    return [t for t, n in zip(tasks, norms.tolist()) if n <= eps]


def cosine_matrix(task_grads: Mapping[str, torch.Tensor], eps: float = 1e-12) -> tuple[list[str], torch.Tensor]:
    """Pairwise cosine similarity of the tasks' gradients: ``cos_ij = ⟨g_i, g_j⟩ / (‖g_i‖ ‖g_j‖)``, a float64
    ``[T, T]`` tensor (tasks in mapping order), computed in float64 and clamped to [−1, 1].

    A task with ``‖g‖ <= eps`` has no direction: every cosine involving it, its own diagonal entry included,
    is defined as 0. A 0 on the diagonal (1 otherwise) is the flag; `zero_norm_tasks` lists such tasks.
    """
    tasks, matrix = _stack(task_grads)
    return tasks, _cosine_from_gram(_gram(matrix), eps)


def _cosine_from_gram(gram: torch.Tensor, eps: float) -> torch.Tensor:
    norms = gram.diagonal().clamp_min(0).sqrt()
    valid = norms > eps
    denom = torch.outer(norms, norms)
    cos = torch.where(valid[:, None] & valid[None, :], gram / denom.where(denom > 0, torch.ones_like(denom)),
                      torch.zeros_like(gram)).clamp(-1.0, 1.0)
    cos.diagonal().copy_(valid.double())
    return cos


@dataclass
class DirectionIndex:
    """Gradient-direction conflict over the ``P = T(T−1)/2`` task pairs (NaN when ``T < 2``).

    ``conflict`` — *the* direction index ``(1/P) Σ_{i<j} max(0, −cos_ij)`` in [0, 1]: 0 when no pair points
    against another, 1 when every pair is exactly opposite (PCGrad's conflict criterion ``cos_ij < 0``,
    weighted by how strongly). ``conflict_fraction`` — ``(1/P) #{i<j : cos_ij < 0}``. ``mean_cosine`` —
    ``(1/P) Σ_{i<j} cos_ij``. ``min_cosine`` — the most conflicting pair's cosine.
    """

    conflict: float
    conflict_fraction: float
    mean_cosine: float
    min_cosine: float
    num_pairs: int


def direction_index(cos: torch.Tensor | Sequence[Sequence[float]]) -> DirectionIndex:
    """Summarise a `cosine_matrix` into the `DirectionIndex` (formulas there; Yu et al., 2020)."""
    cos = torch.as_tensor(cos, dtype=torch.float64)
    expect(cos.dim() == 2 and cos.shape[0] == cos.shape[1], "cos", "a square [T, T] matrix", list(cos.shape))
    t = cos.shape[0]
    rows, cols = torch.triu_indices(t, t, offset=1)
    pairs = cos[rows, cols]
    if pairs.numel() == 0:
        nan = float("nan")
        return DirectionIndex(nan, nan, nan, nan, 0)
    return DirectionIndex(
        conflict=float((-pairs).clamp_min(0).mean()),
        conflict_fraction=float((pairs < 0).double().mean()),
        mean_cosine=float(pairs.mean()),
        min_cosine=float(pairs.min()),
        num_pairs=int(pairs.numel()),
    )


@dataclass
class MagnitudeIndex:
    """Imbalance of the tasks' gradient norms ``n_t = ‖g_t‖₂``, with ``μ = mean n``, ``σ = sqrt(mean (n−μ)²)``
    (population std).

    ``cv`` — *the* magnitude index, the coefficient of variation ``σ / μ``: 0 when all tasks pull equally
    hard, scale-free, and uses every task (at most ``sqrt(T−1)``, when one task has all the gradient).
    ``max_min_ratio`` — ``max n / min n`` (∞ when some but not all norms are 0), the simplest gradient-norm
    ratio. Both NaN when every norm is 0. GradNorm (Chen et al., 2018) balances exactly this spread.
    """

    cv: float
    max_min_ratio: float
    mean_norm: float
    std_norm: float
    min_norm: float
    max_norm: float


def magnitude_index_from_norms(norms: Mapping[str, float] | Sequence[float]) -> MagnitudeIndex:
    """`MagnitudeIndex` of already-computed gradient norms (norms 1 and 4: ratio 4, CV 1.5 / 2.5 = 0.6)."""
    values = np.asarray(list(norms.values()) if isinstance(norms, Mapping) else list(norms), dtype=np.float64)
    expect(values.size > 0 and bool(np.all(values >= 0)), "norms", "one or more non-negative numbers",
           values.tolist())
    mean, std = float(values.mean()), float(values.std())
    lo, hi = float(values.min()), float(values.max())
    ratio = hi / lo if lo > 0 else (math.inf if hi > 0 else math.nan)
    cv = std / mean if mean > 0 else math.nan
    return MagnitudeIndex(cv, ratio, mean, std, lo, hi)


def magnitude_index(task_grads: Mapping[str, torch.Tensor]) -> MagnitudeIndex:
    """`MagnitudeIndex` of the tasks' gradients (formulas there; GradNorm, Chen et al., 2018)."""
    _, matrix = _stack(task_grads)
    norms = _gram(matrix).diagonal().clamp_min(0).sqrt()
    return magnitude_index_from_norms(norms.tolist())


@dataclass
class GradientAnalysis:
    """Direction and magnitude of the tasks' gradients on one parameter group."""

    tasks: list[str]
    cosine: list[list[float]]
    norms: dict[str, float]
    zero_norm_tasks: list[str]
    direction: DirectionIndex
    magnitude: MagnitudeIndex


def analyze_gradients(task_grads: Mapping[str, torch.Tensor], eps: float = 1e-12) -> GradientAnalysis:
    """Cosine matrix, norms, `DirectionIndex` and `MagnitudeIndex` of ``{task: flat gradient}``."""
    tasks, matrix = _stack(task_grads)
    gram = _gram(matrix)
    norms = gram.diagonal().clamp_min(0).sqrt().tolist()
    cos = _cosine_from_gram(gram, eps)
    return GradientAnalysis(
        tasks=tasks, cosine=cos.tolist(), norms=dict(zip(tasks, norms)),
        zero_norm_tasks=[t for t, n in zip(tasks, norms) if n <= eps],
        direction=direction_index(cos), magnitude=magnitude_index_from_norms(norms),
    )


# --------------------------------------------------------------------------------------------------------------
# Parameter statistics
# --------------------------------------------------------------------------------------------------------------

@dataclass
class Histogram:
    """``counts[i]`` values fell in ``[edges[i], edges[i+1])`` (the last bin closed), as `numpy.histogram`."""

    edges: list[float]
    counts: list[int]

    @classmethod
    def of(cls, values: torch.Tensor, bins: int) -> Histogram:
        """Histogram of `values` over their range in float64; a range too narrow for `bins` finite bins (a
        near-constant update) is widened by a relative 1e-6."""
        array = values.detach().double().cpu().numpy().reshape(-1)
        try:
            counts, edges = np.histogram(array, bins=bins)
        except ValueError:
            lo, hi = (float(array.min()), float(array.max())) if array.size else (0.0, 0.0)
            pad = max(abs(lo), abs(hi), 1.0) * 1e-6
            counts, edges = np.histogram(array, bins=bins, range=(lo - pad, hi + pad))
        return cls(edges.tolist(), counts.tolist())


@dataclass
class ParameterStats:
    """One group's weights ``w`` (flattened): ``numel``, ``norm = ‖w‖₂``, ``mean``, ``std`` (population),
    ``min``, ``max`` and a `Histogram`. With a previous snapshot ``w₀``: ``update_norm = ‖w − w₀‖₂``,
    ``relative_update = ‖w − w₀‖₂ / ‖w₀‖₂`` (NaN if ``w₀ = 0``) and the update's histogram."""

    numel: int
    norm: float
    mean: float
    std: float
    min: float
    max: float
    histogram: Histogram
    update_norm: float | None = None
    relative_update: float | None = None
    update_histogram: Histogram | None = None


def snapshot_parameters(connector: nn.Module) -> dict[str, torch.Tensor]:
    """Detached CPU copies of every parameter, by name: the ``previous_state`` for `parameter_stats`."""
    return {name: param.detach().to("cpu", copy=True) for name, param in connector.named_parameters()}


def parameter_stats(connector: nn.Module, previous_state: Mapping[str, torch.Tensor] | None = None, *,
                    bins: int = 50, groups: Mapping[str, Sequence[GroupMember]] | None = None
                    ) -> dict[str, ParameterStats]:
    """`ParameterStats` per group — each expert and the router (``projector`` for an MLP connector); every
    group but ``all`` unless `groups` is given. ``previous_state`` (a `snapshot_parameters` or ``state_dict``
    from an earlier step) adds the update sizes."""
    if groups is None:
        groups = {k: v for k, v in connector_parameter_groups(connector).items() if k != ALL}
    current = dict(connector.named_parameters())
    if previous_state is not None:
        missing = sorted({m.name for members in groups.values() for m in members} - set(previous_state))
        expect(not missing, "previous_state", "an entry for every connector parameter", f"missing {missing}")
    device = next(iter(current.values())).device
    previous = None if previous_state is None else {k: v.detach().to(device) for k, v in previous_state.items()}
    out: dict[str, ParameterStats] = {}
    for key, members in groups.items():
        w = _flatten(members, current).double()
        stats = ParameterStats(
            numel=int(w.numel()), norm=float(w.norm()), mean=float(w.mean()) if w.numel() else math.nan,
            std=float(w.std(correction=0)) if w.numel() else math.nan,
            min=float(w.min()) if w.numel() else math.nan, max=float(w.max()) if w.numel() else math.nan,
            histogram=Histogram.of(w, bins),
        )
        if previous is not None:
            before = _flatten(members, previous).double()
            update = w - before
            base = float(before.norm())
            stats.update_norm = float(update.norm())
            stats.relative_update = stats.update_norm / base if base > 0 else math.nan
            stats.update_histogram = Histogram.of(update, bins)
        out[key] = stats
    return out


# --------------------------------------------------------------------------------------------------------------
# Routing per task
# --------------------------------------------------------------------------------------------------------------

def distribution_entropy(weights: torch.Tensor | Sequence[float]) -> tuple[float, float]:
    """``(H, H / ln E)`` of non-negative weights over E experts, first normalised to ``p = w / Σw``:
    ``H = −Σ_e p_e ln p_e`` (nats, ``0 ln 0 = 0``). Uniform → ``(ln E, 1)``, one-hot → ``(0, 0)``; the
    normalised value is 0 when ``E = 1`` and both are NaN when all weights are 0."""
    w = torch.as_tensor(weights, dtype=torch.float64).reshape(-1)
    total = float(w.sum())
    if total <= 0:
        return math.nan, math.nan
    p = w / total
    h = float(-(p * p.clamp_min(1e-300).log()).where(p > 0, torch.zeros_like(p)).sum())
    h = max(h, 0.0)
    return h, (h / math.log(w.numel()) if w.numel() > 1 else 0.0)


@dataclass
class TaskRouting:
    """One task's mean routing weight per expert over its ``num_tokens`` tokens, and the entropy of that
    (normalised) distribution in nats and divided by ``ln E``: how widely the task spreads over experts."""

    mean_weight: list[float]
    entropy: float
    normalized_entropy: float
    num_tokens: int


def routing_by_task(weights: torch.Tensor | RoutingResult, task_ids: torch.Tensor | Sequence[int | str],
                    task_names: Sequence[str] | Mapping[int, str] | None = None) -> dict[str, TaskRouting]:
    """Mean routing weight per expert for each task present, with its `distribution_entropy`.

    ``weights`` — router probabilities or dense combine weights, ``[N, E]`` or ``[B, L, E]``; a
    `RoutingResult` stands for its ``combine_weights()`` (what actually mixes the experts; pass
    ``routing.router_probs`` for the full distribution). ``task_ids`` — one per token (``N`` or ``[B, L]``) or
    one per sample (``[B]``, tokens laid out sample-major as connectors produce them). Tasks are keyed by
    ``task_names[id]`` when given, else by ``str(id)``. Agrees with `cmoe.stats.mean_weight_per_task`.
    """
    if isinstance(weights, RoutingResult):
        weights = weights.combine_weights()
    weights = torch.as_tensor(weights).detach()
    expect(weights.dim() in (2, 3), "weights", "an [N, E] or [B, L, E] tensor", list(weights.shape))
    flat = weights.reshape(-1, weights.shape[-1]).double().cpu()
    if isinstance(task_ids, torch.Tensor):
        labels: list[Any] = task_ids.reshape(-1).tolist()
    else:
        labels = list(task_ids)
    n, m = flat.shape[0], len(labels)
    expect(m > 0 and n % m == 0, "task_ids", f"one id per token ({n}) or per sample (a divisor of {n})", m)
    repeat = n // m

    def name(label: Any) -> str:
        if task_names is not None and not isinstance(label, str):
            return str(task_names[int(label)])
        return str(label)

    names = [name(label) for label in labels]
    tasks = list(dict.fromkeys(names))
    codes = torch.tensor([tasks.index(t) for t in names]).repeat_interleave(repeat)
    out: dict[str, TaskRouting] = {}
    for code, task in enumerate(tasks):
        mask = codes == code
        mean = flat[mask].mean(0)
        entropy, normalized = distribution_entropy(mean)
        out[task] = TaskRouting(mean.tolist(), entropy, normalized, int(mask.sum()))
    return out


# --------------------------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------------------------

def agg_figure(width: float, height: float) -> Any:
    """A matplotlib Figure on the non-interactive Agg canvas (no pyplot, no global backend switch)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: Any, path: str | os.PathLike) -> Path:
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))


def plot_cosine_heatmap(cosine: torch.Tensor | Sequence[Sequence[float]], tasks: Sequence[str],
                        path: str | os.PathLike, *, title: str | None = None,
                        zero_norm_tasks: Sequence[str] = ()) -> Path:
    """Task × task gradient cosines, diverging colormap centred at 0 (−1 blue … +1 red), values annotated;
    zero-norm tasks are starred. Written to `path` (PNG)."""
    cos = np.asarray(torch.as_tensor(cosine, dtype=torch.float64).tolist(), dtype=np.float64).reshape(
        len(tasks), len(tasks))
    size = max(4.0, 1.0 + 0.9 * len(tasks))
    fig = agg_figure(size + 1.2, size)
    ax = fig.add_subplot()
    image = ax.imshow(cos, cmap="RdBu_r", vmin=-1.0, vmax=1.0)
    labels = [f"{t}*" if t in set(zero_norm_tasks) else str(t) for t in tasks]
    ax.set_xticks(range(len(tasks)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(tasks)), labels)
    for i in range(len(tasks)):
        for j in range(len(tasks)):
            value = cos[i, j]
            ax.text(j, i, "–" if not np.isfinite(value) else f"{value:.2f}", ha="center", va="center",
                    fontsize=9, color="white" if np.isfinite(value) and abs(value) > 0.6 else "black")
    ax.set_xlabel("task")
    ax.set_ylabel("task")
    fig.colorbar(image, ax=ax, label="gradient cosine similarity")
    note = "\n* zero gradient: its cosines are set to 0" if zero_norm_tasks else ""
    ax.set_title((title or "Gradient cosine similarity between tasks") + note, fontsize=10)
    return save_png(fig, path)


def plot_index_curves(report: TugOfWarReport, path: str | os.PathLike, *, groups: Sequence[str] | None = None,
                      title: str | None = None) -> Path:
    """Direction (conflict) and magnitude (CV) indexes over training steps, one line per parameter group."""
    direction, magnitude = report.index_curves("direction"), report.index_curves("magnitude")
    expect(bool(direction), "report", "at least one recorded step with gradients", "none")
    names = list(direction) if groups is None else [g for g in groups if g in direction]
    fig = agg_figure(11.0, 4.2)
    axes = fig.subplots(1, 2)
    panels = ((axes[0], direction, "direction index: mean max(0, −cos)", "Gradient direction conflict"),
              (axes[1], magnitude, "magnitude index: CV of task gradient norms", "Gradient magnitude imbalance"))
    for ax, curves, ylabel, subtitle in panels:
        for group in names:
            steps, values = curves[group]
            ax.plot(steps, values, marker="o", markersize=3, label=group)
        ax.set_xlabel("training step")
        ax.set_ylabel(ylabel)
        ax.set_title(subtitle)
        ax.grid(alpha=0.3)
        if len(names) > 1:
            ax.legend(title="parameter group", fontsize=8)
    fig.suptitle(title or "Tug-of-war indexes over training")
    return save_png(fig, path)


def plot_routing_bars(routing: Mapping[str, TaskRouting | Sequence[float]], path: str | os.PathLike, *,
                      title: str | None = None) -> Path:
    """Stacked bars: each task's mean routing weight per expert (normalised entropy above each bar)."""
    expect(len(routing) > 0, "routing", "a non-empty {task: routing} mapping", {})
    tasks = list(routing)
    rows = [np.asarray(r.mean_weight if isinstance(r, TaskRouting) else list(r), dtype=np.float64)
            for r in routing.values()]
    experts = max(len(r) for r in rows)
    expect(all(len(r) == experts for r in rows), "routing", "the same number of experts for every task",
           [len(r) for r in rows])
    fig = agg_figure(max(5.0, 1.2 + 0.9 * len(tasks)), 4.5)
    ax = fig.add_subplot()
    bottom = np.zeros(len(tasks))
    colors = [f"C{e % 10}" for e in range(experts)]
    for e in range(experts):
        heights = np.array([r[e] for r in rows])
        ax.bar(range(len(tasks)), heights, bottom=bottom, color=colors[e], label=f"expert {e}")
        bottom += heights
    for i, r in enumerate(routing.values()):
        if isinstance(r, TaskRouting) and math.isfinite(r.normalized_entropy):
            ax.text(i, bottom[i], f"H={r.normalized_entropy:.2f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(tasks)), tasks, rotation=30, ha="right")
    ax.set_xlabel("task")
    ax.set_ylabel("mean routing weight")
    ax.set_ylim(0, max(1.0, float(bottom.max())) * 1.12)
    if experts > 1:
        ax.legend(title="expert", fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title(title or "Routing weight per expert for each task (H = entropy / ln E)")
    return save_png(fig, path)


def plot_parameter_histograms(parameters: Mapping[str, ParameterStats], path: str | os.PathLike, *,
                              title: str | None = None) -> Path:
    """One row per group: its weight histogram and, when a previous snapshot was given, its update histogram."""
    expect(len(parameters) > 0, "parameters", "a non-empty {group: ParameterStats} mapping", {})
    with_updates = any(p.update_histogram is not None for p in parameters.values())
    cols = 2 if with_updates else 1
    fig = agg_figure(5.0 * cols, 1.2 + 2.2 * len(parameters))
    axes = np.asarray(fig.subplots(len(parameters), cols, squeeze=False))
    for row, (group, stats) in enumerate(parameters.items()):
        panels = [(stats.histogram, "weight value",
                   f"{group}: weights (‖w‖={stats.norm:.3g}, mean={stats.mean:.2g}, std={stats.std:.2g})")]
        if with_updates:
            rel = stats.relative_update
            panels.append((stats.update_histogram, "update value (w − w_prev)",
                           f"{group}: update (‖Δw‖/‖w_prev‖={rel:.2g})" if rel is not None else f"{group}: no update"))
        for col, (hist, xlabel, subtitle) in enumerate(panels):
            ax = axes[row, col]
            if hist is not None:
                ax.stairs(hist.counts, hist.edges, fill=True, color="C0" if col == 0 else "C1")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("count")
            ax.set_title(subtitle, fontsize=9)
    fig.suptitle(title or "Connector parameter distributions per expert / router")
    return save_png(fig, path)


def write_report(report: TugOfWarReport, out_dir: str | os.PathLike, *, step: int | None = None,
                 plots: bool = True) -> list[Path]:
    """Write ``tug_of_war.json`` into `out_dir` and, with `plots`, every applicable PNG: ``index_curves.png``,
    and for the chosen step (default the last) ``cosine_<group>.png`` per group, ``routing.png`` and
    ``parameter_histograms.png`` when that step has routing / parameter statistics."""
    out_dir = Path(out_dir)
    paths = [report.save_json(out_dir / REPORT_JSON)]
    if not report.steps or not plots:
        return paths
    chosen = report.steps[-1] if step is None else next((s for s in report.steps if s.step == step), None)
    expect(chosen is not None, "step", f"one of the recorded steps {[s.step for s in report.steps]}", step)
    if any(s.gradients for s in report.steps):
        paths.append(plot_index_curves(report, out_dir / "index_curves.png"))
    for group, analysis in chosen.gradients.items():
        paths.append(plot_cosine_heatmap(
            analysis.cosine, analysis.tasks, out_dir / f"cosine_{group}.png",
            title=f"Gradient cosine between tasks — {group}, step {chosen.step}",
            zero_norm_tasks=analysis.zero_norm_tasks))
    if chosen.routing:
        paths.append(plot_routing_bars(chosen.routing, out_dir / "routing.png",
                                       title=f"Routing weight per expert for each task, step {chosen.step}"))
    if chosen.parameters:
        paths.append(plot_parameter_histograms(chosen.parameters, out_dir / "parameter_histograms.png",
                                               title=f"Connector parameters per group, step {chosen.step}"))
    return paths
