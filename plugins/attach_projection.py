"""The projection a CMoE replaces inside a family's connector, found off the modules themselves.

`find_projection` locates the last ``nn.Linear`` mapping to the text width (with the Linear and activation right
before it when they form Linear-act-Linear, or a family adapter's weights) and returns it as a `Projection`:
where it sits, the weights it holds (for the CMoE's widths and for upcycling) and its activation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from cmoe.errors import expect

Layers = list[tuple[torch.Tensor, "torch.Tensor | None"]]

_ACTIVATIONS = {
    "GELUActivation": "gelu", "GELUTanh": "gelu_tanh", "PytorchGELUTanh": "gelu_tanh",
    "NewGELUActivation": "gelu_tanh", "FastGELUActivation": "gelu_tanh", "SiLU": "silu", "SiLUActivation": "silu",
    "ReLU": "relu", "QuickGELUActivation": "quick_gelu",
}


def activation_name(module: nn.Module) -> str | None:
    """The `cmoe.experts.ACTIVATIONS` name computing what `module` computes, or None if there is none."""
    if isinstance(module, nn.GELU):
        return "gelu_tanh" if module.approximate == "tanh" else "gelu"
    return _ACTIVATIONS.get(type(module).__name__)


def text_width(model: nn.Module) -> int:
    """The language model's hidden width, read off its input embeddings (no config field assumed)."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    expect(isinstance(embeddings, nn.Embedding), "model", "a model whose get_input_embeddings() is an nn.Embedding",
           type(embeddings).__name__)
    return embeddings.embedding_dim


def resolve(root: nn.Module, path: str) -> nn.Module | None:
    module = root
    for part in path.split("."):
        module = getattr(module, part, None)
        if not isinstance(module, nn.Module):
            return None
    return module


def split_path(path: str) -> tuple[str, str]:
    parent, _, name = path.rpartition(".")
    return parent, name


@dataclass
class Projection:
    """The part of a connector a CMoE replaces: children `names` of `parent` (a Linear, or Linear-act-Linear;
    a single child when the whole module is replaced), with the weights it held and its activation."""

    connector_path: str
    parent: nn.Module
    names: list[str]
    layers: Layers
    activation: str | None
    description: str
    adapter: str | None = None

    @property
    def in_features(self) -> int:
        return self.layers[0][0].shape[1]

    @property
    def out_features(self) -> int:
        return self.layers[-1][0].shape[0]

    def default_options(self) -> dict[str, Any]:
        """CMoE options whose experts have exactly this projection's shape (so they can be upcycled from it)."""
        options: dict[str, Any] = dict(in_features=self.in_features, out_features=self.out_features,
                                       expert_bias=any(b is not None for _, b in self.layers))
        if len(self.layers) == 2:
            options.update(expert="mlp", expert_hidden=self.layers[0][0].shape[0], expert_activation=self.activation)
        else:
            options.update(expert="linear")
        return options


def _linear_layers(*linears: nn.Linear) -> Layers:
    return [(m.weight, m.bias) for m in linears]


def find_projection(model: nn.Module, connector_path: str, projection: str | None = None,
                    adapter: str | None = None) -> Projection:
    """Locate the final projection of the connector at `connector_path` (see the module docstring)."""
    connector = resolve(model, connector_path)
    expect(connector is not None, "connector path", f"a module at {connector_path!r}", "nothing there")
    width = text_width(model)
    if adapter is not None:
        from cmoe.plugins.attach_adapters import ADAPTERS

        parent_path, name = split_path(connector_path)
        layers, activation = ADAPTERS[adapter].layers(connector)
        return Projection(connector_path, resolve(model, parent_path) if parent_path else model, [name], layers,
                          activation, f"{type(connector).__name__} projection weight (adapter {adapter!r})",
                          adapter)
    if isinstance(connector, nn.Linear):
        parent_path, name = split_path(connector_path)
        return Projection(connector_path, resolve(model, parent_path) if parent_path else model, [name],
                          _linear_layers(connector), None, "the whole connector (Linear)")
    if projection is not None:
        path = projection
    else:
        linears = [n for n, m in connector.named_modules() if isinstance(m, nn.Linear) and m.out_features == width]
        expect(bool(linears), f"connector {connector_path}", f"an nn.Linear with out_features={width} (the text "
               "width) to replace; give the family an adapter in cmoe.plugins.attach_adapters",
               f"{type(connector).__name__} without one")
        path = linears[-1]
    parent_path, name = split_path(path)
    parent = resolve(connector, parent_path) if parent_path else connector
    final = getattr(parent, name)
    expect(isinstance(final, nn.Linear), "projection", "an nn.Linear", type(final).__name__)
    children = list(parent._modules.items())
    index = [n for n, _ in children].index(name)
    if index >= 2:
        (first_name, first), (act_name, act) = children[index - 2], children[index - 1]
        if isinstance(first, nn.Linear) and activation_name(act) and first.out_features == final.in_features:
            description = f"{first_name}-{act_name}-{name} (Linear-{type(act).__name__}-Linear)"
            if isinstance(parent, nn.Sequential) and len(children) == 3 and parent is not connector:
                grand_path, seq_name = split_path(parent_path)
                grand = resolve(connector, grand_path) if grand_path else connector
                return Projection(connector_path, grand, [seq_name], _linear_layers(first, final),
                                  activation_name(act), f"{parent_path} {description}")
            prefix = f"{parent_path}." if parent_path else ""
            return Projection(connector_path, parent, [first_name, act_name, name], _linear_layers(first, final),
                              activation_name(act), prefix + description)
    return Projection(connector_path, parent, [name], _linear_layers(final), None, f"{path} (Linear)")
