"""A recipe model's memory before any is spent: the model built on the meta device, with shapes, dtypes and
``requires_grad`` but no storage (`build_on_meta`: seconds for the 7B paper model, and what FSDP's ranks > 0
build), and one training step's bytes estimated from it (`estimate_memory`), which the trainer prints before
its first step. The paper-scale model itself (random-weight config, parameter counts per part, materialisation
on a device) is in `cmoe.reference_models.unimed.paper.scale`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from cmoe.reference_models.unimed.config import RecipeConfig

GiB = 1024 ** 3

__all__ = ["GiB", "MemoryEstimate", "build_on_meta", "estimate_memory"]


def build_on_meta(config: RecipeConfig, tokenizer) -> nn.Module:
    """The model of `config` on the meta device: shapes, dtypes and ``requires_grad`` without any storage."""
    from cmoe.reference_models.unimed.model.assembly import build_model

    with torch.device("meta"):
        return build_model(config.model, tokenizer)


@dataclass
class MemoryEstimate:
    """Bytes one training step needs on one device (no sharding): weights, gradients and AdamW state of the
    trainable parameters, and activations (an estimate, see `estimate_memory`)."""

    frozen_weights: int
    trainable_weights: int
    gradients: int
    optimizer: int
    activations: int

    @property
    def total(self) -> int:
        return self.frozen_weights + self.trainable_weights + self.gradients + self.optimizer + self.activations

    def format(self) -> str:
        parts = [("frozen weights", self.frozen_weights), ("trainable weights", self.trainable_weights),
                 ("gradients", self.gradients), ("AdamW state", self.optimizer), ("activations (est.)", self.activations)]
        shown = ", ".join(f"{label} {value / GiB:.2f}" for label, value in parts)
        return f"memory estimate per device: {self.total / GiB:.2f} GiB ({shown} GiB)"


def estimate_memory(model: nn.Module, batch_size: int, text_tokens: int, visual_tokens: int = 64,
                    gradient_checkpointing: bool = True) -> MemoryEstimate:
    """One step's memory from the parameters' sizes and dtypes, and an activation estimate for the LLM.

    Gradients take the trainable parameters' dtype, AdamW two float32 moments each. Activations follow
    Korthikanti et al. (2022), ``34·B·S·H`` half-precision bytes per decoder layer (attention through SDPA, so
    no ``S²`` score matrix), all layers without checkpointing, or one layer plus each layer's input
    (``2·B·S·H·L`` bytes) with it; plus the logits (``10·B·S·V`` bytes: half, float32 copy, its gradient)
    and the connector's layer outputs in float32 (every expert runs on every token in the dense original)."""
    frozen = trainable = grads = 0
    for parameter in model.parameters():
        size = parameter.numel() * parameter.element_size()
        if parameter.requires_grad:
            trainable += size
            grads += size
        else:
            frozen += size
    optimizer = 8 * sum(p.numel() for p in model.parameters() if p.requires_grad)
    config = getattr(getattr(model.llm, "model", None), "config", None)
    hidden = getattr(config, "hidden_size", 0)
    layers = getattr(config, "num_hidden_layers", 0)
    vocab = getattr(config, "vocab_size", 0)
    tokens = batch_size * (text_tokens + visual_tokens)
    per_layer = 34 * tokens * hidden
    llm = per_layer + 2 * tokens * hidden * layers if gradient_checkpointing else per_layer * layers
    widths = sum(p.shape[:-1].numel() for p in model.connector.parameters() if p.dim() >= 2)
    connector = 4 * batch_size * visual_tokens * widths  # every layer output of every expert and the gate
    return MemoryEstimate(frozen, trainable, grads, optimizer, llm + 10 * tokens * vocab + connector)
