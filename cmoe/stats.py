"""Routing statistics: how tokens spread over experts, and how each task uses them."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cmoe.routers import RoutingResult


@dataclass
class RoutingStats:
    """``tokens_per_expert`` [E] assignment counts; ``load`` [E] their fractions; ``mean_probs`` [E] mean
    router probability; ``entropy`` mean per-token entropy of the router distribution (nats)."""

    tokens_per_expert: torch.Tensor
    load: torch.Tensor
    mean_probs: torch.Tensor
    entropy: float


@torch.no_grad()
def routing_stats(routing: RoutingResult) -> RoutingStats:
    counts = routing.tokens_per_expert()
    probs = routing.router_probs.float()
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1).mean()
    return RoutingStats(counts, counts.float() / max(routing.expert_index.numel(), 1), probs.mean(0),
                        float(entropy))


@torch.no_grad()
def mean_weight_per_task(routing: RoutingResult, task_ids: torch.Tensor, num_tasks: int) -> torch.Tensor:
    """Mean mixing weight of each expert over the tokens of each task: ``[num_tasks, E]`` (NaN rows for tasks
    absent from the batch). Tokens are assumed laid out sample-major, as connectors produce them."""
    weights = routing.combine_weights().float()
    per_sample = weights.view(task_ids.shape[0], -1, routing.num_experts).mean(1)
    sums = per_sample.new_zeros(num_tasks, routing.num_experts).index_add(0, task_ids.long(), per_sample)
    counts = torch.bincount(task_ids.long(), minlength=num_tasks).float()[:, None]
    return sums / counts
