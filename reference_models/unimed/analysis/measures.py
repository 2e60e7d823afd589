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

Everything is computed per parameter group (`gradients.connector_parameter_groups`); `report.TugOfWarReport`
collects the numbers step by step and `plots` draws them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from cmoe.errors import expect
from cmoe.reference_models.unimed.analysis.gradients import (
    ALL,
    GroupMember,
    connector_parameter_groups,
    flatten_group,
)
from cmoe.routers import RoutingResult

_GRAM_CHUNK = 1 << 22  # columns per float64 block when forming the task Gram matrix (bounds peak memory)

__all__ = [
    "DirectionIndex", "GradientAnalysis", "Histogram", "MagnitudeIndex", "ParameterStats", "TaskRouting",
    "analyze_gradients", "cosine_matrix", "direction_index", "distribution_entropy", "magnitude_index",
    "magnitude_index_from_norms", "parameter_stats", "routing_by_task", "snapshot_parameters", "zero_norm_tasks",
]


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
        w = flatten_group(members, current).double()
        stats = ParameterStats(
            numel=int(w.numel()), norm=float(w.norm()), mean=float(w.mean()) if w.numel() else math.nan,
            std=float(w.std(correction=0)) if w.numel() else math.nan,
            min=float(w.min()) if w.numel() else math.nan, max=float(w.max()) if w.numel() else math.nan,
            histogram=Histogram.of(w, bins),
        )
        if previous is not None:
            before = flatten_group(members, previous).double()
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

