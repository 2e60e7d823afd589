"""Expert projections with weights stacked as ``[E, out, in]`` tensors — one layout for every backend.

An experts module is a stack of ``layers`` (weight ``[E, out, in]``, optional bias ``[E, out]``) with an
activation between consecutive layers. Backends only read ``layers`` and ``activation``, so any expert type
that fits this shape (linear, n-layer MLP) runs on every backend.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from cmoe.errors import expect

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "quick_gelu": lambda t: t * torch.sigmoid(1.702 * t),
}


class StackedExperts(nn.Module):
    """``E`` experts, each a chain of affine layers with `activation` between them, weights stacked on dim 0."""

    def __init__(
        self,
        num_experts: int,
        widths: list[int],
        bias: bool = True,
        activation: str = "gelu",
    ):
        super().__init__()
        expect(isinstance(num_experts, int) and num_experts >= 1, "num_experts", "an int >= 1", num_experts)
        expect(len(widths) >= 2 and all(isinstance(w, int) and w >= 1 for w in widths),
               "expert widths", "at least two positive ints (in, ..., out)", widths)
        expect(activation in ACTIVATIONS, "activation", f"one of {sorted(ACTIVATIONS)}", repr(activation))
        self.num_experts = num_experts
        self.widths = list(widths)
        self.activation_name = activation
        self.weights = nn.ParameterList(
            nn.Parameter(torch.empty(num_experts, w_out, w_in)) for w_in, w_out in zip(widths[:-1], widths[1:])
        )
        self.biases = nn.ParameterList(
            nn.Parameter(torch.empty(num_experts, w_out)) for w_out in widths[1:]
        ) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Each expert initialised like an independent ``nn.Linear`` (Kaiming-uniform, fan-in bound)."""
        for i, weight in enumerate(self.weights):
            bound = 1.0 / math.sqrt(weight.shape[-1])
            nn.init.uniform_(weight, -bound, bound)
            if self.biases is not None:
                nn.init.uniform_(self.biases[i], -bound, bound)

    @property
    def in_features(self) -> int:
        return self.widths[0]

    @property
    def out_features(self) -> int:
        return self.widths[-1]

    @property
    def activation(self) -> Callable[[torch.Tensor], torch.Tensor]:
        return ACTIVATIONS[self.activation_name]

    @property
    def layers(self) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """``[(weight [E, out, in], bias [E, out] or None), ...]`` in application order."""
        biases = list(self.biases) if self.biases is not None else [None] * len(self.weights)
        return list(zip(self.weights, biases))

    def forward_expert(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        """Apply expert `expert` alone to rows `x` [n, in] → [n, out]."""
        layers = self.layers
        for i, (weight, bias) in enumerate(layers):
            x = F.linear(x, weight[expert], None if bias is None else bias[expert])
            if i < len(layers) - 1:
                x = self.activation(x)
        return x

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, widths={self.widths}, "
                f"bias={self.biases is not None}, activation={self.activation_name}")


class LinearExperts(StackedExperts):
    """``E`` affine maps in → out."""

    def __init__(self, num_experts: int, in_features: int, out_features: int, *,
                 hidden_features: int | None = None, bias: bool = True, activation: str = "gelu"):
        expect(hidden_features is None, "expert_hidden", "None for 'linear' experts (they have no hidden "
               "layer; use expert='mlp' for a hidden width)", hidden_features)
        super().__init__(num_experts, [in_features, out_features], bias=bias, activation=activation)


class MLPExperts(StackedExperts):
    """``E`` two-layer MLPs in → hidden → out with an activation (GELU, as Uni-Med's experts) in between."""

    def __init__(
        self,
        num_experts: int,
        in_features: int,
        out_features: int,
        *,
        hidden_features: int | None = None,
        bias: bool = True,
        activation: str = "gelu",
    ):
        hidden = out_features if hidden_features is None else hidden_features
        super().__init__(num_experts, [in_features, hidden, out_features], bias=bias, activation=activation)
