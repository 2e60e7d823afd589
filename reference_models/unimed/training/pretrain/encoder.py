"""The tiny CLIP tower trained with supervised heads on its patch tokens (`train_encoder`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cmoe.reference_models.unimed.data.synthetic import MODALITIES
from cmoe.reference_models.unimed.training.pretrain.config import (
    ENCODER_CONFIG,
    GLOBAL_HEADS,
    ORGANS,
    PATCH_CLASSES,
    PretrainConfig,
    schedule,
)
from cmoe.reference_models.unimed.training.pretrain.scenes import SceneSet


def build_encoder(seed: int):
    """The tiny config's CLIP vision tower with random weights drawn from `seed`."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    return CLIPVisionModel(CLIPVisionConfig(**ENCODER_CONFIG))


def patch_features(model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """What the recipe feeds the connector: the last hidden state without CLS, ``[N, patches, width]``."""
    return model(pixel_values=pixels, output_hidden_states=True).hidden_states[-1][:, 1:]


class EncoderHeads(nn.Module):
    """Linear heads on the patch tokens (organ map, modality per token) and on their mean (image labels)."""

    def __init__(self, width: int):
        super().__init__()
        self.patch = nn.Linear(width, len(PATCH_CLASSES))
        self.token_modality = nn.Linear(width, len(MODALITIES))
        self.organs = nn.Linear(width, len(ORGANS))
        self.image = nn.ModuleDict({name: nn.Linear(width, n) for name, n in GLOBAL_HEADS.items()})

    def loss(self, features: torch.Tensor, data: SceneSet, class_weights: torch.Tensor | None = None) -> torch.Tensor:
        pooled = features.mean(1)
        loss = F.cross_entropy(self.patch(features).flatten(0, 1), data.patch.flatten(0, 1), weight=class_weights)
        modality = data.labels["modality"][:, None].expand(-1, features.shape[1])
        loss = loss + F.cross_entropy(self.token_modality(features).flatten(0, 1), modality.flatten())
        loss = loss + F.binary_cross_entropy_with_logits(self.organs(pooled), data.organs)
        for name, head in self.image.items():
            loss = loss + F.cross_entropy(head(pooled), data.labels[name])
        return loss



def train_encoder(config: PretrainConfig, data: SceneSet, log=print) -> nn.Module:
    """The tiny CLIP tower trained with `EncoderHeads` on `data`; returns the tower (heads dropped)."""
    model = build_encoder(config.seed)
    heads = EncoderHeads(model.config.hidden_size)
    params = [*model.parameters(), *heads.parameters()]
    optimizer = torch.optim.AdamW(params, lr=config.encoder_lr, weight_decay=0.01)
    scheduler = schedule(optimizer, config.encoder_steps)
    generator = torch.Generator().manual_seed(config.seed)
    # Background fills ~88 % of the patches and lesions ~0.5 %: weight the patch classes by frequency^-1/2.
    frequency = data.patch.mean((0, 1)).clamp(min=1e-4)
    class_weights = frequency.rsqrt() / (frequency * frequency.rsqrt()).sum()
    model.train()
    for step in range(config.encoder_steps):
        index = torch.randint(len(data), (config.encoder_batch,), generator=generator)
        batch = data.take(index)
        loss = heads.loss(patch_features(model, batch.pixels), batch, class_weights)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        if (step + 1) % max(1, config.encoder_steps // 10) == 0:
            log(f"encoder step {step + 1}/{config.encoder_steps}: loss {float(loss.detach()):.4f}")
    return model.eval()
