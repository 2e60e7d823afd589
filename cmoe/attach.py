"""Put a CMoE connector into an existing multimodal model, in place, and take it out again.

Which module is "the connector" differs per model family; attachers registered by plugins
(`cmoe_register_attachers`) know each family. ``attach`` asks every registered attacher whether it
``matches`` the model and lets the first that does replace the connector. Task ids are given per image.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol

import torch
from torch import nn

from cmoe.config import CMoEConfig, ConnectorConfig
from cmoe.connector import PretrainedConnector, build_connector
from cmoe.errors import CMoEError
from cmoe.registry import ATTACHERS

STATE_ATTRIBUTE = "_cmoe_attached"


class Attacher(Protocol):
    """What an attacher plugin provides for one MLLM family."""

    def matches(self, model: nn.Module) -> bool: ...

    def default_config(self, model: nn.Module, **overrides: Any) -> CMoEConfig: ...

    def attach(self, model: nn.Module, connector: PretrainedConnector) -> None: ...

    def detach(self, model: nn.Module) -> PretrainedConnector: ...

    def set_task_ids(self, model: nn.Module, task_ids: torch.Tensor | None) -> None: ...


def find_attacher(model: nn.Module, name: str | None = None) -> tuple[str, Attacher]:
    """The attacher named `name`, or the first registered one that matches `model`."""
    if name is not None:
        return name, ATTACHERS.get(name)
    for candidate in ATTACHERS.names():
        attacher = ATTACHERS.get(candidate)
        if attacher.matches(model):
            return candidate, attacher
    raise CMoEError(f"model: expected a multimodal model a registered attacher knows "
                    f"(attachers: {', '.join(ATTACHERS.names()) or 'none'}), got {type(model).__name__}; "
                    "register an attacher plugin for this family")


def attach(
    model: nn.Module,
    connector: PretrainedConnector | ConnectorConfig | None = None,
    *,
    attacher: str | None = None,
    **config_overrides: Any,
) -> PretrainedConnector:
    """Replace `model`'s connector in place with a CMoE (or any cmoe connector) and return the connector.

    `connector` is a built connector, a config to build one from, or None to build a `CMoEConfig` with the
    widths read off the model and `config_overrides` (e.g. ``num_experts=4, top_k=2``). After attaching,
    ``model(..., task_ids=...)`` routes by task, ``output.loss`` includes the connector's aux loss, and
    ``output.cmoe_aux_loss`` / ``output.cmoe_routing`` expose it; `detach` restores the original.
    """
    if getattr(model, STATE_ATTRIBUTE, None) is not None:
        raise CMoEError("model: already has a cmoe connector attached; call cmoe.detach(model) first")
    name, found = find_attacher(model, attacher)
    if connector is None:
        connector = build_connector(found.default_config(model, **config_overrides))
    elif config_overrides:
        raise CMoEError(f"config_overrides {sorted(config_overrides)}: only allowed when no connector or config "
                        "is given")
    elif isinstance(connector, ConnectorConfig):
        connector = build_connector(connector)
    if not isinstance(connector, PretrainedConnector):
        raise CMoEError(f"connector: expected a cmoe connector or config, got {type(connector).__name__}")
    reference = next(model.parameters(), None)
    if reference is not None:
        connector.to(device=reference.device)
    found.attach(model, connector)
    setattr(model, STATE_ATTRIBUTE, name)
    return connector


def detach(model: nn.Module) -> PretrainedConnector:
    """Restore the model's original connector; returns the cmoe connector that was attached."""
    name = getattr(model, STATE_ATTRIBUTE, None)
    if name is None:
        raise CMoEError("model: expected a model with a cmoe connector attached (cmoe.attach), got one without")
    connector = ATTACHERS.get(name).detach(model)
    delattr(model, STATE_ATTRIBUTE)
    return connector


@contextmanager
def using_task_ids(model: nn.Module, task_ids: torch.Tensor | list[int]) -> Iterator[None]:
    """Route by these task ids (one per image) for every call inside the block — e.g. around ``generate``,
    which does not pass unknown keyword arguments on to ``forward``."""
    name = getattr(model, STATE_ATTRIBUTE, None)
    if name is None:
        raise CMoEError("model: expected a model with a cmoe connector attached (cmoe.attach), got one without")
    found = ATTACHERS.get(name)
    found.set_task_ids(model, torch.as_tensor(task_ids))
    try:
        yield
    finally:
        found.set_task_ids(model, None)
