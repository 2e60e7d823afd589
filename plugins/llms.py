"""LLM plugin: any HF causal LM (LLaMA-2/3, Qwen2, Mistral, Phi, ...) from a local path or a config, fed
``inputs_embeds`` by a connector, with LoRA through peft."""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch
from torch import nn

from cmoe.errors import CMoEError, unset_variables_hint
from cmoe.extras import require
from cmoe.plugins.hf_local import local_load_options

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class CausalLM(nn.Module):
    """A causal LM behind the small interface connectors need: its embedding width, token embeddings, and
    a forward / generate on ``inputs_embeds``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    @property
    def hidden_size(self) -> int:
        """The embedding width: a connector's ``out_features`` must equal it."""
        return self.model.get_input_embeddings().embedding_dim

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(input_ids)

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, **kwargs: Any) -> Any:
        if inputs_embeds.shape[-1] != self.hidden_size:
            raise CMoEError(f"inputs_embeds: expected width {self.hidden_size} (the LLM's hidden size), got "
                            f"{inputs_embeds.shape[-1]}; set the connector's out_features to {self.hidden_size}")
        return self.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels, **kwargs)

    def generate(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 **kwargs: Any) -> torch.Tensor:
        return self.model.generate(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs)


def build_hf_causal_lm(
    path: str | os.PathLike | None = None,
    config: dict[str, Any] | None = None,
    dtype: torch.dtype | str | None = None,
    lora: dict[str, Any] | None = None,
    gradient_checkpointing: bool = False,
    upcast: torch.dtype | str | None = None,
) -> CausalLM:
    """Build from a LOCAL checkpoint directory (`path`) or from `config` (a dict with ``model_type``, e.g.
    ``{"model_type": "llama", "hidden_size": 64, ...}``, random weights). `lora` (e.g. ``{"r": 8}``) wraps
    the model with peft (see `apply_lora`). `upcast` casts the weights, once loaded in `dtype`, to that dtype
    (Uni-Med loads LLaMA in float16 and peft's ``prepare_model_for_kbit_training`` casts it to float32)."""
    require("hf", "the hf_causal_lm LLM")
    from transformers import AutoConfig, AutoModelForCausalLM

    if (path is None) == (config is None):
        raise CMoEError("hf_causal_lm: expected exactly one of path (a local checkpoint directory) or config "
                        f"(a dict with model_type), got path={path!r} and config={'set' if config else None}")
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if path is not None:
        if not os.path.isdir(path):
            raise CMoEError(f"path: expected a local checkpoint directory, got {str(path)!r} (not found)"
                            f"{unset_variables_hint(path)}; nothing is downloaded — download the weights yourself "
                            "and pass their folder")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **local_load_options())
    else:
        options = dict(config)
        model_type = options.pop("model_type", None)
        if model_type is None:
            raise CMoEError("config: expected a 'model_type' key (e.g. 'llama', 'qwen2', 'mistral', 'phi3')")
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **options))
        if dtype is not None:
            model = model.to(dtype)
    if upcast is not None:
        model = model.to(getattr(torch, upcast) if isinstance(upcast, str) else upcast)
    if gradient_checkpointing:  # transformers >= 5.2x names it activation checkpointing; older, gradient
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
    if lora is not None:
        model = apply_lora(model, **lora)
    return CausalLM(model)


def apply_lora(model: nn.Module, r: int = 8, alpha: int = 16, dropout: float = 0.05,
               target_modules: Any = None, only_under: str | None = None,
               trainable: tuple[str, ...] = (), modules_to_save: list[str] | None = None) -> nn.Module:
    """Wrap `model` with peft LoRA (Uni-Med: r 8, alpha 16, dropout 0.05 on q/k/v/o/gate/up/down) and keep
    every parameter whose name contains one of `trainable` (e.g. the connector) fully trainable.

    `only_under` (e.g. ``"language_model"``) limits LoRA to modules below that name, so a whole MLLM can be
    wrapped without touching its vision tower (CLIP has ``q_proj`` too). `modules_to_save` (peft's option,
    e.g. ``["embed_tokens", "lm_head"]``) trains full copies of those modules, for a randomly initialised LLM.
    """
    require("hf", "LoRA")
    from peft import LoraConfig, get_peft_model

    targets = list(LORA_TARGETS) if target_modules is None else target_modules
    if only_under is not None:
        names = "|".join(targets) if isinstance(targets, (list, tuple)) else targets
        targets = rf".*\b{only_under}\b.*\.({names})"
    with warnings.catch_warnings():
        # peft reads transformers' deprecated `is_gradient_checkpointing`; the warning is theirs, not the user's.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                                                      target_modules=targets, task_type="CAUSAL_LM",
                                                      modules_to_save=modules_to_save))
    for name, parameter in peft_model.named_parameters():
        if any(part in name for part in trainable):
            parameter.requires_grad_(True)
    return peft_model
