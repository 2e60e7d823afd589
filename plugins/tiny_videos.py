"""Video batches for the tiny random models of `tiny_families`: two samples holding one video each, of
different lengths where the family's video layout allows it, for the attach tests of video inputs.

`build_video(family)` returns ``(model, inputs, video tokens per sample)`` for the families in `VIDEO_FAMILIES`: the same tiny
model `tiny_families.build` makes, and a video-only batch (``pixel_values_videos`` plus the family's extra video
arguments). The number of video tokens in each prompt is measured with the model's own
``get_video_features``, as the image batches measure theirs."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from cmoe.plugins.tiny_families import BATCH, BUILDERS, IMAGE_TOKEN, count_features, prompt

# Frames per video. LLaVA-style families take one [videos, frames, 3, H, W] tensor, so every video has as
# many frames; Qwen-style ones take flattened patches with ``video_grid_thw``, so the two videos differ.
LLAVA_FRAMES = 2
QWEN_GRIDS = ((2, 4, 4), (1, 4, 4))
LLAVA_STYLE = ("video_llava", "llava_next_video", "llava_onevision")
QWEN_STYLE = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "glm4v", "glm4v_moe")
# Families whose prompts carry each frame of a video as its own token group (their processors put timestamps
# between frames; their M-RoPE index splits ``video_grid_thw`` into one grid per frame).
FRAME_GROUPS = ("qwen3_vl", "qwen3_vl_moe", "glm4v", "glm4v_moe")
# GLM-4.1V/4.5V mark video frames with the image token (``mm_token_type_ids`` tells them apart).
IMAGE_TOKEN_FOR_VIDEO = ("glm4v", "glm4v_moe")
VIDEO_FAMILIES = LLAVA_STYLE + QWEN_STYLE
VIDEO_TOKEN = IMAGE_TOKEN + 1  # inside the tiny vocabulary; the Qwen-style tiny configs already use it


def _video_token(model: nn.Module, family: str) -> int:
    """The token the prompt repeats for video features; LLaVA-style defaults lie outside the tiny vocabulary,
    so those configs are pointed at `VIDEO_TOKEN`."""
    config = model.config
    if family in IMAGE_TOKEN_FOR_VIDEO:
        return int(config.image_token_id)
    if family in LLAVA_STYLE:
        for key in ("video_token_id", "video_token_index"):
            if hasattr(config, key):
                setattr(config, key, VIDEO_TOKEN)
    return int(getattr(config, "video_token_id", None) or getattr(config, "video_token_index"))


def _llava_style(model: nn.Module) -> tuple[dict[str, Any], list[int]]:
    """``pixel_values_videos [videos, frames, 3, H, W]`` and the video tokens of each video, measured."""
    size = model.config.vision_config.image_size
    videos = torch.randn(BATCH, LLAVA_FRAMES, 3, size, size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        features = getattr(model, "model", model).get_video_features(pixel_values_videos=videos)
    return {"pixel_values_videos": videos}, [count_features(features) // BATCH] * BATCH


def _qwen_style(model: nn.Module) -> tuple[dict[str, Any], list[int]]:
    """Flattened video patches with ``video_grid_thw``: one 2-frame-group video and one 1-group video."""
    config = model.config.vision_config
    grid = torch.tensor(QWEN_GRIDS)
    width = getattr(config, "in_channels", 3) * getattr(config, "temporal_patch_size", 1) * config.patch_size ** 2
    pixels = torch.randn(int(grid.prod(-1).sum()), width, generator=torch.Generator().manual_seed(2))
    merge = config.spatial_merge_size ** 2
    return {"pixel_values_videos": pixels, "video_grid_thw": grid}, [int(g.prod()) // merge for g in grid]


def build_video(family: str) -> tuple[nn.Module, dict[str, Any], list[int]]:
    """The tiny `family` model, a batch of two one-video samples, and the video tokens of each sample."""
    if family not in VIDEO_FAMILIES:
        raise ValueError(f"no video batch for {family!r}; known: {', '.join(VIDEO_FAMILIES)}")
    model, _ = BUILDERS[family]()
    token = _video_token(model, family)
    if family in LLAVA_STYLE:
        videos, tokens = _llava_style(model)
        batch = prompt(tokens, token)
    else:
        videos, tokens = _qwen_style(model)
        frames = videos["video_grid_thw"][:, 0].tolist()
        groups = [[n // t] * t if family in FRAME_GROUPS else n for n, t in zip(tokens, frames)]
        batch = prompt(groups, token, prefix=[IMAGE_TOKEN + 2], suffix=[IMAGE_TOKEN + 3])
    if "mm_token_type_ids" in inspect.signature(model.forward).parameters:
        batch["mm_token_type_ids"] = (batch["input_ids"] == token).int() * 2  # 0 text, 1 image, 2 video
    return model, {**batch, **videos}, tokens
