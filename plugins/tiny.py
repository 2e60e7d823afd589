"""Tiny HF multimodal models built from configs with random weights (well under a second, no downloads),
plus inputs that fit them: for tests, examples and the tiny default recipe."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from cmoe.extras import require

IMAGE_TOKEN = 999


def tiny_llama_config(vocab_size: int = 1000, hidden_size: int = 64, **overrides: Any) -> dict[str, Any]:
    """Options for `build_hf_causal_lm(config=...)`: a 2-layer LLaMA."""
    options = dict(model_type="llama", vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                   bos_token_id=1, eos_token_id=2, pad_token_id=0)
    options.update(overrides)
    return options


def tiny_llava() -> nn.Module:
    """LLaVA with a 2-layer CLIP (width 32, 32 px images, patch 8 → 16 patches) and a 2-layer LLaMA (width 64)."""
    require("hf", "tiny_llava")
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8)
    text_options = tiny_llama_config()
    text_options.pop("model_type")
    config = LlavaConfig(vision_config=vision, text_config=LlamaConfig(**text_options), image_token_id=IMAGE_TOKEN,
                         image_seq_length=16)
    return LlavaForConditionalGeneration(config)


def llava_inputs(model: nn.Module, batch: int = 2, text: int = 6, seed: int = 0) -> dict[str, torch.Tensor]:
    """A batch for `tiny_llava`: one image per sample with ``config.image_seq_length`` image tokens, then text."""
    gen = torch.Generator().manual_seed(seed)
    vision = model.config.vision_config
    tokens = model.config.image_seq_length
    words = torch.randint(3, 900, (batch, text), generator=gen)
    input_ids = torch.cat([torch.ones(batch, 1, dtype=torch.long), torch.full((batch, tokens), IMAGE_TOKEN), words], 1)
    labels = input_ids.clone()
    labels[:, : 1 + tokens] = -100
    pixels = torch.randn(batch, 3, vision.image_size, vision.image_size, generator=gen)
    return dict(input_ids=input_ids, pixel_values=pixels, labels=labels)


def tiny_qwen2_vl() -> nn.Module:
    """Qwen2-VL with a 2-layer vision tower (width 32, patch 4, merge 2×2) and a 2-layer text model (width 64)."""
    require("hf", "tiny_qwen2_vl")
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    config = Qwen2VLConfig(
        vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2, patch_size=4,
                           spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
        text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=1000, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}),
        image_token_id=990, video_token_id=991, vision_start_token_id=992, vision_end_token_id=993)
    return Qwen2VLForConditionalGeneration(config)


def qwen2_vl_inputs(model: nn.Module, grids: tuple[tuple[int, int, int], ...] = ((1, 4, 4), (1, 4, 8)),
                    text: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """A batch for `tiny_qwen2_vl`: one image per sample (grid t×h×w patches), left-padded."""
    gen = torch.Generator().manual_seed(seed)
    vision, config = model.config.vision_config, model.config
    merge = vision.spatial_merge_size ** 2
    grid = torch.tensor(grids)
    patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2
    pixels = torch.randn(int(grid.prod(-1).sum()), patch_dim, generator=gen)
    rows = [[1, config.vision_start_token_id] + [config.image_token_id] * (int(g.prod()) // merge)
            + [config.vision_end_token_id] + torch.randint(3, 900, (text,), generator=gen).tolist() for g in grid]
    width = max(map(len, rows))
    input_ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    attention_mask = (input_ids != 0).long()
    labels = torch.where(input_ids < 900, input_ids, -100).masked_fill(attention_mask == 0, -100)
    return dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixels, image_grid_thw=grid,
                mm_token_type_ids=(input_ids == config.image_token_id).int(), labels=labels)
