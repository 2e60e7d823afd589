"""The ``paper`` model at full size without its weights: counted per part and materialised straight onto a
device (built on the meta device by `model.memory.build_on_meta`, its training memory estimated there too).

* `random_weight_config` turns the ``paper`` config into one that needs no files: EVA-CLIP ViT-g and LLaMA-2-7B
  with random weights (from their architectures), a word-level tokenizer and the synthetic set.
* `materialize` allocates a meta-built model on a device (frozen parts in the model's half precision,
  trainable ones in float32) and fills it with a random init, so no full-precision 7B copy ever exists on the
  host.
* `parameter_counts` splits the parameters into the paper's parts.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from cmoe.reference_models.unimed.config import RecipeConfig, load_config

LLAMA2_7B: dict[str, Any] = dict(model_type="llama", hidden_size=4096, intermediate_size=11008,
                                 num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                                 vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
                                 tie_word_embeddings=False)
"""LLaMA-2-7B's architecture (``config.json`` of ``Llama-2-7b-chat-hf``): 6,738,415,616 parameters."""

PAPER_PARTS = ("vision_encoder", "llm", "lora", "router", "task_tokens", "experts")

__all__ = ["LLAMA2_7B", "PAPER_PARTS", "materialize", "parameter_counts", "part_of", "random_weight_config"]


def random_weight_config(overrides: dict[str, Any] | None = None, base: str = "paper") -> RecipeConfig:
    """`base` (the paper's recipe) with random-weight EVA-CLIP ViT-g and LLaMA-2-7B instead of local files, a
    word-level tokenizer and the synthetic set; `overrides` are merged on top (e.g. smaller widths)."""
    from cmoe.reference_models.unimed.config import merge_overrides

    replaced: dict[str, Any] = {
        "model": {"vision_encoder": {"name": "eva_clip_g", "options": {"_replace": True}},
                  "llm": {"name": "hf_causal_lm", "options": {"_replace": True, "config": dict(LLAMA2_7B)}},
                  "tokenizer": {"_replace": True, "kind": "word_level"}},
        "data": {"_replace": True, "synthetic": {"num_images": 24, "image_size": 224, "qa_questions": 8,
                                                 "eval_images": 4}},
    }
    return load_config(base, merge_overrides(replaced, overrides or {}))


def part_of(name: str) -> str:
    """Which of `PAPER_PARTS` a parameter of the Uni-Med model belongs to."""
    if name.startswith("vision_encoder."):
        return "vision_encoder"
    if name.startswith("llm."):
        return "lora" if "lora_" in name else "llm"
    if name.startswith("connector.router.task_embedding"):
        return "task_tokens"
    if name.startswith("connector.router."):
        return "router"
    return "experts"


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Parameters per part (`PAPER_PARTS`; the MLP connector's weights count as ``experts``), plus ``total``."""
    counts = dict.fromkeys(PAPER_PARTS, 0)
    for name, parameter in model.named_parameters():
        counts[part_of(name)] += parameter.numel()
    counts["total"] = sum(counts.values())
    return counts


@torch.no_grad()
def materialize(model: nn.Module, device: torch.device | str, frozen_dtype: torch.dtype | None = None,
                seed: int = 0) -> nn.Module:
    """Allocate a meta-built `model` on `device` (``to_empty``) and fill it with a random init there: normal
    weights (std 0.02), zero biases, unit norm weights; frozen parameters optionally cast to `frozen_dtype`
    (the original keeps its ViT and LLM in float16), trainable ones stay as built (float32). Nothing is built
    on the host first."""
    model.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    for name, parameter in model.named_parameters():
        if frozen_dtype is not None and not parameter.requires_grad and parameter.is_floating_point():
            parameter.data = parameter.data.to(frozen_dtype)
        last = name.rsplit(".", 1)[-1]
        if "norm" in name.lower() and last == "weight" or name.endswith("ln_vision.weight"):
            parameter.fill_(1.0)
        elif last == "bias" or "lora_B" in name:
            parameter.zero_()
        else:
            parameter.normal_(0.0, 0.02, generator=generator)
    for module in model.modules():  # rotary frequencies, computed at init: rebuilt by the module's own class
        if isinstance(getattr(module, "inv_freq", None), torch.Tensor) and hasattr(module, "config"):
            fresh = type(module)(module.config)
            for name, buffer in fresh.named_buffers(recurse=False):
                setattr(module, name, buffer.to(device))
            if hasattr(fresh, "attention_scaling"):
                module.attention_scaling = fresh.attention_scaling
    return model
