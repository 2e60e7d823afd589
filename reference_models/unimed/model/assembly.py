"""The Uni-Med model: vision encoder → token aggregation → connector (CMoE or MLP) → LLM with LoRA.

Built from a `ModelSection` through the plugin registries, so any registered encoder or LLM can replace
EVA-CLIP / LLaMA-2. The connector's visual embeddings replace the image placeholder of each prompt; the loss
covers the answer tokens only; generation is greedy.
"""

from __future__ import annotations

import dataclasses
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cmoe.aggregation import pool_tokens
from cmoe.config import CMoEConfig, ConnectorConfig, MLPConnectorConfig
from cmoe.connector import PretrainedConnector, build_connector
from cmoe.errors import CMoEError, UnknownNameError
from cmoe.reference_models.unimed.config import AggregationConfig, ModelSection
from cmoe.reference_models.unimed.model.collate import IMAGE_TASKS, Batch
from cmoe.reference_models.unimed.original import original_task_experts
from cmoe.reference_models.unimed.prompt_style import PROMPT_STYLES, PromptStyle
from cmoe.reference_models.unimed.prompts import clean_answer, original_answer
from cmoe.registry import get_llm, get_vision_encoder

IGNORE_INDEX = -100

_ORIGINAL = dict(num_experts=5, router="task_token", router_gate="mlp", expert="mlp",
                 router_options={"topk_weights": "renormalized"})
_ORIGINAL_FIXED = dict(num_experts=5, expert="mlp")  # hard / constant: no gate, hence no router_gate
CONNECTOR_PRESETS: dict[str, dict[str, Any]] = {
    "original": _ORIGINAL,
    "original_sparse": {**_ORIGINAL, "top_k": 2, "router_rule": "softmax"},
    "original_hard": {**_ORIGINAL_FIXED, "router": "hard_task",
                      "router_options": {"task_experts": original_task_experts(IMAGE_TASKS)}},
    "original_constant": {**_ORIGINAL_FIXED, "router": "constant"},
    "token_topk": dict(num_experts=5, router="token_topk", top_k=2, expert="mlp", load_balance_coef=0.01),
    "light": dict(num_experts=5, router="task_token", router_gate="linear", expert="mlp"),
    "task": dict(num_experts=5, router="task", expert="mlp"),
    "mlp": {},
}
"""Connector presets: the original's soft task+token router over 5 MLP experts (5632→4096→4096 at paper
scale, MLP router 11264→45056→5, sigmoid-normalised), its sparse / hard / constant variants, our token top-k
and light (linear task+token gate) variants, and the plain MLP projector baseline (``mlp``).

The ``original*`` presets follow the original at every setting: top-k weights are a softmax over the k selected
logits (``topk_weights="renormalized"``, so weight 1 at k = 1; the Switch-style convention is
``router_options: {topk_weights: switch}``), and the hard router sends each task to the expert of its position
in the original's task list (`original.ORIGINAL_TASKS`), failing when there are fewer experts than tasks."""

_FIXED_ROUTERS = ("hard_task", "constant")
_GATE_SIZES = ("router_hidden", "task_embed_dim")


def _mlp_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """Options of a CMoE preset carried over to the MLP baseline: its own fields, and ``expert_hidden`` as its
    ``hidden_features`` (the MLP is one expert); other CMoE fields are dropped, anything else is an error."""
    mlp_fields = {f.name for f in dataclasses.fields(MLPConnectorConfig)}
    cmoe_fields = {f.name for f in dataclasses.fields(CMoEConfig)}
    unknown = sorted(set(fields) - mlp_fields - cmoe_fields)
    if unknown:
        raise CMoEError(f"model.connector.options: unknown field(s) {unknown} for preset 'mlp'; known: "
                        f"{sorted(mlp_fields - {'in_features', 'out_features', 'aggregate_tokens'})}")
    kept = {k: v for k, v in fields.items() if k in mlp_fields}
    if fields.get("expert_hidden") is not None:
        kept.setdefault("hidden_features", fields["expert_hidden"])
    return kept


def connector_config(preset: str, in_features: int, out_features: int, aggregate_tokens: int,
                     options: dict[str, Any] | None = None) -> ConnectorConfig:
    """The connector config of `preset` for an encoder of width `in_features` and an LLM of width
    `out_features`, with `options` overriding preset fields (``router_options`` are merged key by key).

    The fixed routers (``hard_task``, ``constant``) have no gate: the sizes of a gate in `options`
    (``router_hidden``, ``task_embed_dim``, as the tiny config sets) are dropped for them, so one options block
    serves every preset; ``router_gate: mlp`` with a fixed router stays an error."""
    if preset not in CONNECTOR_PRESETS:
        raise UnknownNameError("connector preset", preset, CONNECTOR_PRESETS)
    options = dict(options or {})
    fields = {**CONNECTOR_PRESETS[preset], **options}
    if "router_options" in options and "router_options" in CONNECTOR_PRESETS[preset]:
        fields["router_options"] = {**CONNECTOR_PRESETS[preset]["router_options"], **options["router_options"]}
    common = dict(in_features=in_features, out_features=out_features, aggregate_tokens=aggregate_tokens)
    if preset == "mlp":
        return MLPConnectorConfig(**common, **_mlp_fields(fields))
    if fields.get("router") in _FIXED_ROUTERS:
        fields = {k: v for k, v in fields.items() if k not in _GATE_SIZES}
    return CMoEConfig(**common, num_tasks=len(IMAGE_TASKS), **fields)


@dataclass
class UniMedOutput:
    """``loss`` (mean over answer tokens, plus the connector's aux loss), per-sample answer losses, the aux
    loss, and the routing weights of each image's visual tokens ``[images, tokens, E]`` (None for MLP)."""

    loss: torch.Tensor
    sample_losses: torch.Tensor
    aux_loss: torch.Tensor
    routing_weights: torch.Tensor | None


class UniMedModel(nn.Module):
    """The assembled model. Only the connector and the LLM's LoRA weights train; the encoder is frozen."""

    def __init__(self, vision_encoder: nn.Module, connector: PretrainedConnector, llm: nn.Module, tokenizer,
                 aggregation: AggregationConfig, connector_autocast: str | None = None):
        super().__init__()
        self.vision_encoder, self.connector, self.llm = vision_encoder, connector, llm
        self.tokenizer = tokenizer
        self.aggregation = aggregation
        self.connector_autocast = connector_autocast

    def _connector_context(self, device: torch.device):
        """Autocast for the connector when ``model.connector_autocast`` asks for it (the original's fp16)."""
        if self.connector_autocast is None:
            return nullcontext()
        return torch.autocast(device.type, dtype=getattr(torch, self.connector_autocast))

    def visual_embeddings(self, pixel_values: torch.Tensor, task_ids: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """``[images, tokens, llm width]`` embeddings of the images, and the connector's output."""
        with torch.no_grad():
            features = self.vision_encoder(pixel_values)
        if self.aggregation.kind in ("avg", "max"):
            features = pool_tokens(features, self.aggregation.window, self.aggregation.kind)
        connector_dtype = next(self.connector.parameters(), features).dtype
        with self._connector_context(features.device):
            out = self.connector(features.to(connector_dtype), task_ids)
        return out.hidden_states, out

    def _sequences(self, batch: Batch, with_answers: bool) -> tuple[list[torch.Tensor], list[torch.Tensor], Any]:
        """Per-sample input embeddings and labels: [before | image | after | answer]."""
        device = batch.task_ids.device
        embed = self.llm.embed  # one lookup for the whole batch, split per sample
        images, out = None, None
        if batch.pixel_values is not None:
            image_rows = [i for i, text in enumerate(batch.texts) if text.has_image]
            images, out = self.visual_embeddings(batch.pixel_values, batch.task_ids[image_rows])
        rows = [text.before + text.after + (text.answer if with_answers else []) for text in batch.texts]
        all_embeds = embed(torch.tensor([i for row in rows for i in row], dtype=torch.long, device=device))
        per_sample = all_embeds.split([len(row) for row in rows])
        sequences, labels, image_index = [], [], 0
        for text, token_embeds in zip(batch.texts, per_sample):
            answer = text.answer if with_answers else []
            split = len(text.before)
            parts = [token_embeds[:split]]
            label_parts = [torch.full((len(text.before) + len(text.after),), IGNORE_INDEX, device=device)]
            if text.has_image:
                visual = images[image_index].to(token_embeds.dtype)
                image_index += 1
                parts.append(visual)
                label_parts.append(torch.full((visual.shape[0],), IGNORE_INDEX, device=device))
            parts.append(token_embeds[split:])
            label_parts.append(torch.tensor(answer, dtype=torch.long, device=device))
            sequences.append(torch.cat(parts))
            labels.append(torch.cat(label_parts))
        return sequences, labels, out

    def forward(self, batch: Batch) -> UniMedOutput:
        sequences, labels, connector_out = self._sequences(batch, with_answers=True)
        length = max(seq.shape[0] for seq in sequences)
        embeds = torch.stack([F.pad(seq, (0, 0, 0, length - seq.shape[0])) for seq in sequences])
        mask = torch.stack([torch.arange(length, device=embeds.device) < seq.shape[0] for seq in sequences]).long()
        target = torch.stack([F.pad(lab, (0, length - lab.shape[0]), value=IGNORE_INDEX) for lab in labels])
        logits = self.llm(inputs_embeds=embeds, attention_mask=mask).logits
        shifted, target = logits[:, :-1].float(), target[:, 1:]
        token_loss = F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), target.reshape(-1),
                                     ignore_index=IGNORE_INDEX, reduction="none").view(target.shape)
        counted = (target != IGNORE_INDEX).float()
        sample_losses = token_loss.sum(1) / counted.sum(1).clamp(min=1)
        loss = token_loss.sum() / counted.sum().clamp(min=1)
        aux = embeds.new_zeros((), dtype=torch.float32)
        routing = None
        if connector_out is not None:
            aux = connector_out.aux_loss.float()
            if connector_out.routing is not None:
                images = connector_out.hidden_states.shape[0]
                routing = connector_out.routing.combine_weights().view(images, -1, connector_out.routing.num_experts)
        return UniMedOutput(loss + aux, sample_losses.detach(), aux.detach(), routing)

    @torch.no_grad()
    def generate(self, batch: Batch, max_new_tokens: int = 100, style: PromptStyle | None = None) -> list[str]:
        """Greedy answers, left-padded, read as `style` says (default ``cmoe``): ``cut_answers`` drops ``</s>``,
        collapses whitespace and keeps 50 words; otherwise the text is kept whole as the original's ``generate``
        returns it (cut at a literal ``</s>``, ``<s>`` removed, what follows the last ``[/INST]``, stripped)."""
        return self.generate_with_routing(batch, max_new_tokens, style)[0]

    @torch.no_grad()
    def generate_with_routing(self, batch: Batch, max_new_tokens: int = 100, style: PromptStyle | None = None
                              ) -> tuple[list[str], torch.Tensor | None]:
        """`generate`'s answers and the connector's combine weights of each image's visual tokens
        ``[images, tokens, E]`` (None without images or for an MLP connector)."""
        style = style or PROMPT_STYLES["cmoe"]
        sequences, _, connector_out = self._sequences(batch, with_answers=False)
        routing = None
        if connector_out is not None and connector_out.routing is not None:
            images = connector_out.hidden_states.shape[0]
            routing = connector_out.routing.combine_weights().view(images, -1, connector_out.routing.num_experts)
        length = max(seq.shape[0] for seq in sequences)
        embeds = torch.stack([F.pad(seq, (0, 0, length - seq.shape[0], 0)) for seq in sequences])
        mask = torch.stack([torch.arange(length, device=embeds.device) >= length - seq.shape[0]
                            for seq in sequences]).long()
        tokenizer = self.tokenizer
        output = self.llm.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=max_new_tokens,
                                   do_sample=False, num_beams=1, pad_token_id=tokenizer.pad_token_id,
                                   eos_token_id=tokenizer.eos_token_id)
        texts = tokenizer.batch_decode(output, skip_special_tokens=True)
        if style.cut_answers:
            return [clean_answer(text) for text in texts], routing
        return [original_answer(text, tokenizer.bos_token, tokenizer.eos_token) for text in texts], routing

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The parameters that train (connector, LoRA): what a checkpoint holds, as in the original."""
        return {name: p for name, p in self.named_parameters() if p.requires_grad}


def _llm_options(section: ModelSection, tokenizer) -> dict[str, Any]:
    options = dict(section.llm.options)
    if isinstance(options.get("config"), dict):
        config = dict(options["config"])
        config.setdefault("vocab_size", len(tokenizer))
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            config.setdefault(key, getattr(tokenizer, key))
        options["config"] = config
    if section.lora.enabled:
        lora = dict(r=section.lora.r, alpha=section.lora.alpha, dropout=section.lora.dropout)
        for key in ("target_modules", "modules_to_save"):
            if getattr(section.lora, key) is not None:
                lora[key] = getattr(section.lora, key)
        options["lora"] = lora
    if section.gradient_checkpointing:
        options["gradient_checkpointing"] = True
    options.setdefault("dtype", section.dtype)
    if section.llm_upcast is not None:
        options.setdefault("upcast", section.llm_upcast)
    return options


def build_model(section: ModelSection, tokenizer) -> UniMedModel:
    """Assemble the model a `ModelSection` describes, with `tokenizer` (its size sets a config-built LLM's
    vocabulary). The encoder is frozen; without LoRA the LLM is frozen too; the connector trains and stays in
    float32 (autocast runs its matmuls in the training precision)."""
    encoder = get_vision_encoder(section.vision_encoder.name)(**section.vision_encoder.options)
    llm = get_llm(section.llm.name)(**_llm_options(section, tokenizer))
    if not section.lora.enabled:
        for parameter in llm.parameters():
            parameter.requires_grad_(False)
    width = getattr(encoder, "out_features", None)
    if width is None:
        raise CMoEError(f"vision encoder {section.vision_encoder.name!r}: expected an `out_features` attribute "
                        "(its token width); build it as a cmoe VisionEncoder")
    rate = section.aggregation.rate if section.aggregation.kind == "reshape" else 1
    config = connector_config(section.connector.preset, width, llm.hidden_size, rate, section.connector.options)
    connector = build_connector(config)
    return UniMedModel(encoder, connector, llm, tokenizer, section.aggregation, section.connector_autocast)
