"""Routing statistics on a hand-made routing with known answers."""

from __future__ import annotations

import math

import pytest
import torch

from cmoe import RoutingResult, mean_weight_per_task, routing_stats


def hand_routing() -> RoutingResult:
    # 2 samples × 2 tokens, 3 experts, top-1; sample 0 → expert 0 (weights 1.0, 0.5), sample 1 → expert 2
    index = torch.tensor([[0], [0], [2], [2]])
    weight = torch.tensor([[1.0], [0.5], [1.0], [1.0]])
    probs = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    return RoutingResult(index, weight, probs, probs.clamp_min(1e-9).log())


def test_routing_stats_by_hand() -> None:
    stats = routing_stats(hand_routing())
    assert stats.tokens_per_expert.tolist() == [2, 0, 2]
    assert stats.load.tolist() == [0.5, 0.0, 0.5]
    torch.testing.assert_close(stats.mean_probs, torch.tensor([0.375, 0.125, 0.5]))
    assert stats.entropy == pytest.approx(math.log(2) / 4)  # only token 1 is uncertain


def test_mean_weight_per_task_by_hand() -> None:
    per_task = mean_weight_per_task(hand_routing(), torch.tensor([1, 0]), num_tasks=3)
    torch.testing.assert_close(per_task[0], torch.tensor([0.0, 0.0, 1.0]))   # task 0 = sample 1
    torch.testing.assert_close(per_task[1], torch.tensor([0.75, 0.0, 0.0]))  # task 1 = sample 0
    assert torch.isnan(per_task[2]).all()                                     # task 2 absent
