"""Connectors between a vision encoder and an LLM: the Connector-MoE and the plain MLP baseline.

Both take visual tokens ``x [B, N, in_features]`` (and optional per-sample ``task_ids [B]``) and return a
`ConnectorOutput` whose ``hidden_states`` are ``[B, N / aggregate_tokens, out_features]``. Both save to and
load from a local directory (``config.json`` + ``model.safetensors``, written atomically).
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, TypeVar

import torch
from torch import nn

from cmoe.aggregation import aggregate_tokens
from cmoe.checkpointing import atomic_directory, verify_directory
from cmoe.config import CONFIG_NAME, CMoEConfig, ConnectorConfig, MLPConnectorConfig, read_config_json
from cmoe.dispatch import check_backend_name, moe_project
from cmoe.errors import CMoEError, expect
from cmoe.experts import ACTIVATIONS
from cmoe.io import load_tensors, save_tensors
from cmoe.registry import get_expert, get_router
from cmoe.routers import RoutingResult

WEIGHTS_NAME = "model.safetensors"
M = TypeVar("M", bound="PretrainedConnector")


@dataclass
class ConnectorOutput:
    """``hidden_states`` [B, N/aggregate, out]; ``aux_loss`` a scalar to add to the task loss (0 without aux
    losses); ``routing`` the router's decision over the ``B·N/aggregate`` tokens (None for the MLP)."""

    hidden_states: torch.Tensor
    aux_loss: torch.Tensor
    routing: RoutingResult | None = None


class PretrainedConnector(nn.Module):
    """Shared ``save_pretrained`` / ``from_pretrained`` for connectors built from one config object."""

    config_class: ClassVar[type[ConnectorConfig]] = ConnectorConfig

    def __init__(self, config: ConnectorConfig):
        super().__init__()
        expect(isinstance(config, self.config_class), "config", self.config_class.__name__,
               type(config).__name__)
        self.config = config

    def _check_input(self, x: torch.Tensor) -> None:
        width = self.config.in_features
        expect(isinstance(x, torch.Tensor) and x.dim() == 3 and x.shape[-1] == width, "x",
               f"a [batch, tokens, {width}] tensor (in_features={width})",
               lambda: f"shape {list(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__)
        expect(x.is_floating_point(), "x", "a floating-point tensor", x.dtype)
        expect(x.device.type != "meta", "x", "a tensor with data (not on the meta device)",
               "a meta tensor; materialise it (e.g. model.to_empty(device=...) and load weights) first")
        expect(x.shape[0] > 0 and x.shape[1] > 0, "x", "at least one sample and one token",
               lambda: f"shape {list(x.shape)}; skip the connector for an empty batch")
        weight = next(self.parameters(), None)
        if weight is not None and not torch.is_autocast_enabled(x.device.type):
            expect(weight.device.type != "meta", "connector", "materialised weights",
                   "parameters on the meta device; load its weights (from_pretrained) or call .to_empty() first")
            expect(x.dtype == weight.dtype, "x", f"dtype {weight.dtype} (the connector's weights)",
                   lambda: f"{x.dtype}; cast with x.to({weight.dtype}) or connector.to({x.dtype}), or run under "
                           "torch.autocast")

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write ``config.json``, ``model.safetensors`` and their checksums into `directory` as one atomic unit
        (a sibling temporary directory renamed into place, see `cmoe.checkpointing`)."""
        directory = Path(directory)
        with atomic_directory(directory) as tmp:
            save_tensors(tmp / WEIGHTS_NAME, self.state_dict(),
                         metadata={"format": "pt", "connector_type": self.config.connector_type})
            self.config.save_pretrained(tmp)
        return directory

    @classmethod
    def from_pretrained(cls: type[M], directory: str | os.PathLike, device: str | torch.device = "cpu") -> M:
        """Rebuild the connector from `directory` written by `save_pretrained` (local paths only)."""
        directory = Path(directory)
        if not (directory / CONFIG_NAME).is_file():
            read_config_json(directory)  # raises the error naming the missing config.json
        verify_directory(directory)
        config = cls.config_class.from_pretrained(directory)
        weights = directory / WEIGHTS_NAME
        if not weights.is_file():
            raise CMoEError(f"{weights}: missing; a connector directory holds {CONFIG_NAME} and {WEIGHTS_NAME}: "
                            "save the connector again")
        model = cls(config)
        try:
            model.load_state_dict(load_tensors(weights, device=device), strict=True)
        except RuntimeError as error:
            raise CMoEError(f"{weights}: its tensors do not fit the connector {CONFIG_NAME} describes ({error}); "
                            "the two files come from different saves: save the connector again") from None
        return model.to(device)


def _check_options(cls: type, options: dict, argument: str, what: str) -> None:
    """Raise `CMoEError` for keyword options `cls` does not accept (unless it takes ``**kwargs``)."""
    parameters = inspect.signature(cls).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    unknown = sorted(set(options) - set(parameters))
    expect(not unknown, argument, lambda: f"options {what} accepts: {', '.join(parameters)}", f"unknown {unknown}")


class CMoEConnector(PretrainedConnector):
    """Aggregate tokens → route each token → project it through its experts → mix by the routing weights."""

    config_class = CMoEConfig

    def __init__(self, config: CMoEConfig):
        super().__init__(config)
        width = config.token_features
        check_backend_name(config.backend)
        router_cls = get_router(config.router)
        _check_options(router_cls, config.router_options, "router_options", f"router {config.router!r}")
        self.router = router_cls(
            width, config.num_experts, top_k=config.top_k, num_tasks=config.num_tasks,
            input=config.router_input, rule=config.router_rule, gate=config.router_gate,
            gate_hidden=config.router_hidden, task_embed_dim=config.task_embed_dim,
            renormalize=config.renormalize, noise_std=config.router_noise_std,
            load_balance_coef=config.load_balance_coef, z_loss_coef=config.z_loss_coef,
            check_finite=config.check_finite, **config.router_options,
        )
        self.experts = get_expert(config.expert)(
            config.num_experts, width, config.out_features, hidden_features=config.expert_hidden,
            bias=config.expert_bias, activation=config.expert_activation,
        )

    def forward(self, x: torch.Tensor, task_ids: torch.Tensor | None = None) -> ConnectorOutput:
        self._check_input(x)
        tokens = aggregate_tokens(x, self.config.aggregate_tokens)
        routing = self.router(tokens, task_ids)
        batch, length, width = tokens.shape
        projected = moe_project(tokens.reshape(batch * length, width), self.experts, routing.expert_index,
                                routing.expert_weight, backend=self.config.backend)
        aux = sum(routing.aux_losses.values(), start=x.new_zeros(()))
        return ConnectorOutput(projected.view(batch, length, -1), aux, routing)


class MLPConnector(PretrainedConnector):
    """LLaVA / MiniGPT-v2's projector (Linear → GELU → Linear) behind the same interface; ``task_ids`` is
    accepted and ignored, so the two connectors are interchangeable in ablations."""

    config_class = MLPConnectorConfig

    def __init__(self, config: MLPConnectorConfig):
        super().__init__(config)
        expect(config.activation in ACTIVATIONS, "activation", f"one of {sorted(ACTIVATIONS)}",
               repr(config.activation))
        hidden = config.hidden_features or config.out_features
        self.linear_1 = nn.Linear(config.token_features, hidden, bias=config.bias)
        self.linear_2 = nn.Linear(hidden, config.out_features, bias=config.bias)

    def forward(self, x: torch.Tensor, task_ids: torch.Tensor | None = None) -> ConnectorOutput:
        self._check_input(x)
        tokens = aggregate_tokens(x, self.config.aggregate_tokens)
        hidden = self.linear_2(ACTIVATIONS[self.config.activation](self.linear_1(tokens)))
        return ConnectorOutput(hidden, x.new_zeros(()), None)


CONNECTORS: dict[str, type[PretrainedConnector]] = {"cmoe": CMoEConnector, "mlp": MLPConnector}


def build_connector(config: ConnectorConfig) -> PretrainedConnector:
    """The connector a config describes (`CMoEConfig` → `CMoEConnector`, `MLPConnectorConfig` → `MLPConnector`)."""
    for cls in CONNECTORS.values():
        if isinstance(config, cls.config_class):
            return cls(config)
    raise CMoEError(f"config: expected one of {[c.config_class.__name__ for c in CONNECTORS.values()]}, "
                    f"got {type(config).__name__}")


def load_connector(directory: str | os.PathLike, device: str | torch.device = "cpu") -> PretrainedConnector:
    """Load whichever connector `directory` holds, by the ``connector_type`` in its config.json."""
    kind = read_config_json(directory).get("connector_type")
    expect(kind in CONNECTORS, "connector_type", f"one of {sorted(CONNECTORS)}", repr(kind))
    return CONNECTORS[kind].from_pretrained(directory, device=device)
