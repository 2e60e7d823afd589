"""The connector's parameter groups and each task's gradient on them, as flat vectors: what the tug-of-war
indexes (`measures`) are computed from.

One group per expert (a slice along dim 0 of the stacked ``[E, ...]`` expert weights), one for the router and
one for the whole connector (``"all"``); an MLP connector has only ``"projector"`` and ``"all"``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
from torch import nn

from cmoe.errors import expect

ALL = "all"
ROUTER = "router"
PROJECTOR = "projector"
EXPERT_PREFIX = "expert_"

__all__ = [
    "ALL", "EXPERT_PREFIX", "GroupMember", "PROJECTOR", "ROUTER", "connector_parameter_groups",
    "flat_group_gradients", "flat_group_values", "flatten_group", "per_task_group_gradients",
]


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


def flatten_group(members: Sequence[GroupMember], tensor_of: Mapping[str, torch.Tensor | None]) -> torch.Tensor:
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
    return {key: flatten_group(members, grads) for key, members in groups.items()}


def flat_group_values(connector: nn.Module, groups: Mapping[str, Sequence[GroupMember]] | None = None
                      ) -> dict[str, torch.Tensor]:
    """Each group's parameter values as one flat fp32 vector (what the weight histograms are made of)."""
    groups = connector_parameter_groups(connector) if groups is None else groups
    values = dict(connector.named_parameters())
    return {key: flatten_group(members, values) for key, members in groups.items()}


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
        out[str(task)] = {key: flatten_group(members, by_name) for key, members in groups.items()}
    return out

