"""Small adapters for connectors whose final projection is not an ``nn.Linear``.

An adapter gives the projection's weights (``layers(connector)``, for the CMoE's widths and upcycling) and
wraps the connector so that its own pre-processing runs and the CMoE replaces only the projection
(``wrap(connector, projection)`` returns the module to put in the connector's place; it keeps the attached
projection as its ``projection`` attribute, where ``detach`` finds the connector).
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn


class Adapter(Protocol):
    def layers(self, connector: nn.Module) -> tuple[list[tuple[torch.Tensor, torch.Tensor | None]], str | None]: ...

    def wrap(self, connector: nn.Module, projection: nn.Module) -> nn.Module: ...


class Gemma3Projector(nn.Module):
    """Gemma 3's projector (average pooling of the patch grid → RMS norm → ``@ mm_input_projection_weight``)
    with the CMoE in place of the matmul; the pooling and the norm are the original modules."""

    def __init__(self, original: nn.Module, projection: nn.Module):
        super().__init__()
        self.avg_pool = original.avg_pool
        self.mm_soft_emb_norm = original.mm_soft_emb_norm
        self.patches_per_image = original.patches_per_image
        self.projection = projection

    def forward(self, vision_outputs: torch.Tensor) -> torch.Tensor:
        batch, _, width = vision_outputs.shape
        grid = vision_outputs.transpose(1, 2).reshape(batch, width, self.patches_per_image, self.patches_per_image)
        pooled = self.avg_pool(grid.contiguous()).flatten(2).transpose(1, 2)
        return self.projection(self.mm_soft_emb_norm(pooled)).type_as(vision_outputs)


class _Gemma3:
    def layers(self, connector: nn.Module) -> tuple[list[tuple[torch.Tensor, torch.Tensor | None]], str | None]:
        return [(connector.mm_input_projection_weight.t(), None)], None

    def wrap(self, connector: nn.Module, projection: nn.Module) -> nn.Module:
        return Gemma3Projector(connector, projection)


ADAPTERS: dict[str, Adapter] = {"gemma3": _Gemma3()}
