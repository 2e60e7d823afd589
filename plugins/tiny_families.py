"""Tiny random models of HF image-text-to-text families (transformers 5.x), built from configs, with a batch
of two samples holding one image each: for the attach tests and docs/attach.md.

`build(family)` returns ``(model, inputs)``. Each family's defaults are shrunk generically (only the width,
depth and size fields its configs actually have are overridden), plus the few family-specific fields that
keep the image-token bookkeeping small. The number of image tokens the prompt carries is measured by running
the model's own ``get_image_features`` once, so the prompts always match what the model expects.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, vocab_size=1000, max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
            pad_token_id=0, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, ffn_dim=128, word_embed_proj_dim=64,
            moe_intermediate_size=32, n_routed_experts=4, num_experts=4, num_experts_per_tok=2, n_shared_experts=1,
            first_k_dense_replace=1, num_local_experts=4)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
              patch_size=8, depth=2, embed_dim=32, num_heads=4, out_hidden_size=64, projection_dim=64, head_dim=8)
MROPE = dict(rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 3, 3]))
IMAGE_TOKEN = 900
BATCH = 2


def _shrink(default: dict[str, Any], overrides: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    options = {k: v for k, v in overrides.items() if k in default}
    options.update(extra)
    options.setdefault("model_type", default.get("model_type"))
    return options


def tiny_config(family: str, text: dict | None = None, vision: dict | None = None, **top: Any):
    """The family's default config shrunk to 2 layers and widths 32 (vision) / 64 (text)."""
    from transformers import AutoConfig

    base = AutoConfig.for_model(family)
    options: dict[str, Any] = {}
    text_config = base.get_text_config()
    if text_config is not base:
        options["text_config"] = _shrink(text_config.to_dict(), TEXT, text or {})
    vision_config = getattr(base, "vision_config", None)
    if vision_config is not None:
        options["vision_config"] = _shrink(vision_config.to_dict(), VISION, vision or {})
    if text_config is base:
        options.update({k: v for k, v in TEXT.items() if hasattr(base, k)})
        options.update(text or {})
    for key in ("image_token_id", "image_token_index"):
        if hasattr(base, key):
            options[key] = IMAGE_TOKEN
    options.update(top)
    return AutoConfig.for_model(family, **options)


def _model(config) -> nn.Module:
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config).eval()
    with torch.no_grad():  # zero-initialised gates and projections would hide the image path from the checks
        for name, param in model.named_parameters():
            if param.dim() >= 1 and not name.endswith("bias") and float(param.abs().max()) < 1e-6:
                param.normal_(0.0, 0.2)
    return model


def count_features(features: Any) -> int:
    """Rows of image embeddings in what ``get_image_features`` returned (tensor, list, or model output)."""
    if hasattr(features, "pooler_output") and features.pooler_output is not None:
        features = features.pooler_output
    elif hasattr(features, "last_hidden_state"):
        features = features.last_hidden_state
    if isinstance(features, torch.Tensor):
        return features.numel() // features.shape[-1]
    return sum(count_features(f) for f in features)


SEPARATOR = 7  # the text token between the frames of a video whose frames are separate groups (timestamps)


def prompt(tokens_per_image: list[int] | list[list[int]], image_token: int = IMAGE_TOKEN, text: int = 5,
           seed: int = 0, prefix: list[int] | None = None, suffix: list[int] | None = None) -> dict[str, torch.Tensor]:
    """``input_ids`` / ``attention_mask`` / ``labels`` for one image per sample: BOS, prefix, the image tokens,
    suffix, then `text` words (labels only on the words); left-padded to the longest row. A list of counts for a
    sample gives it several groups (a video's frames), each wrapped in prefix and suffix, `SEPARATOR` between."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for counts in tokens_per_image:
        groups = [(prefix or []) + [image_token] * n + (suffix or []) for n in ([counts] if isinstance(counts, int)
                                                                              else counts)]
        rows.append([1] + [t for g in groups for t in g + [SEPARATOR]][:-1])
    words = [torch.randint(3, 800, (text,), generator=gen).tolist() for _ in rows]
    full = [r + w for r, w in zip(rows, words)]
    width = max(map(len, full))
    input_ids = torch.tensor([[0] * (width - len(r)) + r for r in full])
    attention_mask = (input_ids != 0).long()
    labels = torch.full_like(input_ids, -100)
    labels[:, -text:] = input_ids[:, -text:]
    return dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)


def _pixels(size: int = 32, batch: int = BATCH, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _measured(model: nn.Module, image_kwargs: dict[str, Any], images: int = BATCH) -> list[int]:
    """Image tokens per image, from the model's own ``get_image_features`` (per image where it says so)."""
    inner = getattr(model, "model", model)
    with torch.no_grad():
        features = inner.get_image_features(**image_kwargs)
    pooled = getattr(features, "pooler_output", None)
    if isinstance(pooled, (list, tuple)) and len(pooled) == images:
        return [count_features(f) for f in pooled]
    return [count_features(features) // images] * images


def _plain(family: str, size: int = 32, text: dict | None = None, vision: dict | None = None,
           **top: Any) -> Callable[[], tuple[nn.Module, dict]]:
    """Families fed ``pixel_values [images, 3, H, W]`` whose image tokens are counted off the features."""
    def build() -> tuple[nn.Module, dict]:
        model = _model(tiny_config(family, text, vision, **top))
        image = dict(pixel_values=_pixels(size))
        token = getattr(model.config, "image_token_id", None) or getattr(model.config, "image_token_index")
        return model, {**prompt(_measured(model, image), token), **image}
    return build


def _custom(family: str, images: Callable[[nn.Module], dict[str, Any]], text: dict | None = None,
            vision: dict | None = None, **top: Any) -> Callable[[], tuple[nn.Module, dict]]:
    """Families whose image inputs need more than ``pixel_values [images, 3, H, W]``: `images(model)` makes
    them; the image-token count is measured with the same inputs."""
    def build() -> tuple[nn.Module, dict]:
        model = _model(tiny_config(family, text, vision, **top))
        image = images(model)
        token = getattr(model.config, "image_token_id", None) or getattr(model.config, "image_token_index")
        return model, {**prompt(_measured(model, image), token), **image}
    return build


def _tiles(crops: int, size: int = 32) -> Callable[[nn.Module], dict[str, Any]]:
    return lambda model: dict(pixel_values=_pixels(size).unsqueeze(1).expand(-1, crops, -1, -1, -1).contiguous(),
                              image_sizes=torch.tensor([[size, size]] * BATCH))


def _sized(size: int = 32) -> Callable[[nn.Module], dict[str, Any]]:
    return lambda model: dict(pixel_values=_pixels(size), image_sizes=torch.tensor([[size, size]] * BATCH))


def _qwen_like(family: str, vision: dict | None = None, text: dict | None = None,
               grids: tuple = ((1, 4, 4), (1, 4, 8)), square_patches: bool = False,
               **top: Any) -> Callable[[], tuple[nn.Module, dict]]:
    """Qwen2-VL-style families: flattened patches with ``image_grid_thw``, images of different sizes
    (``[patches, C·t·p·p]``, or ``[patches, C, p, p]`` with `square_patches`)."""
    def build() -> tuple[nn.Module, dict]:
        ids = dict(image_token_id=IMAGE_TOKEN, video_token_id=IMAGE_TOKEN + 1, vision_start_token_id=IMAGE_TOKEN + 2,
                   vision_end_token_id=IMAGE_TOKEN + 3)
        model = _model(tiny_config(family, text, vision, **{**ids, **top}))
        config = model.config.vision_config
        grid = torch.tensor(grids)
        channels = getattr(config, "in_channels", 3) * getattr(config, "temporal_patch_size", 1)
        side = config.patch_size
        shape = (channels, side, side) if square_patches else (channels * side ** 2,)
        pixels = torch.randn(int(grid.prod(-1).sum()), *shape, generator=torch.Generator().manual_seed(1))
        kernel = getattr(config, "merge_kernel_size", None)
        merge = kernel[0] * kernel[1] if kernel else config.spatial_merge_size ** 2
        counts = [int(g.prod()) // merge for g in grid]
        batch = prompt(counts, IMAGE_TOKEN, prefix=[IMAGE_TOKEN + 2], suffix=[IMAGE_TOKEN + 3])
        if "mm_token_type_ids" in inspect.signature(model.forward).parameters:
            batch["mm_token_type_ids"] = (batch["input_ids"] == IMAGE_TOKEN).int()
        return model, {**batch, "pixel_values": pixels, "image_grid_thw": grid}
    return build


def _mllama() -> tuple[nn.Module, dict]:
    """Mllama: tiles ``[B, images, tiles, 3, H, W]`` read through cross-attention; one image token per image."""
    model = _model(tiny_config("mllama", text=dict(cross_attention_layers=[1]),
                               vision=dict(num_global_layers=1, attention_heads=4, vision_output_dim=64,
                                           max_num_tiles=2, intermediate_layers_indices=[0],
                                           supported_aspect_ratios=[[1, 1], [1, 2]]),
                               image_token_index=IMAGE_TOKEN))
    batch = prompt([1] * BATCH)
    pixels = _pixels().unsqueeze(1).unsqueeze(1).expand(-1, 1, 2, -1, -1, -1).contiguous()
    cross = torch.ones(BATCH, batch["input_ids"].shape[1], 1, 2, dtype=torch.long)
    return model, {**batch, "pixel_values": pixels, "aspect_ratio_ids": torch.full((BATCH, 1), 2),
                   "aspect_ratio_mask": torch.ones(BATCH, 1, 2, dtype=torch.long), "cross_attention_mask": cross}


BUILDERS: dict[str, Callable[[], tuple[nn.Module, dict]]] = {
    "llava": _plain("llava", image_seq_length=16),
    "vipllava": _plain("vipllava", vision_feature_layers=[-2, -1]),
    "video_llava": _plain("video_llava", image_seq_length=16),
    "paligemma": _plain("paligemma", projection_dim=64, hidden_size=64, vocab_size=1000),
    "internvl": _plain("internvl"),
    "aya_vision": _plain("aya_vision", downsample_factor=2, alignment_intermediate_size=128),
    "cohere2_vision": _plain("cohere2_vision", downsample_factor=2, alignment_intermediate_size=128),
    "gemma3": _plain("gemma3", mm_tokens_per_image=4, boi_token_index=901, eoi_token_index=902),
    "deepseek_vl": _plain("deepseek_vl"),
    "janus": _plain("janus", vq_config=dict(num_embeddings=32, latent_channels=32, base_channels=32,
                                             channel_multiplier=[1, 2], num_res_blocks=1, projection_dim=64,
                                             image_token_embed_dim=64, num_patches=4)),
    "qwen2_vl": _qwen_like("qwen2_vl", vision=dict(hidden_size=64, embed_dim=32, mlp_ratio=2, patch_size=4,
                                                    spatial_merge_size=2, temporal_patch_size=2), text=MROPE),
    "qwen2_5_vl": _qwen_like("qwen2_5_vl", vision=dict(hidden_size=32, out_hidden_size=64, intermediate_size=64,
                                                        patch_size=4, spatial_merge_size=2, temporal_patch_size=2,
                                                        fullatt_block_indexes=[1], window_size=16), text=MROPE),
    "qwen3_vl": _qwen_like("qwen3_vl", vision=dict(hidden_size=32, out_hidden_size=64, intermediate_size=64,
                                                    patch_size=4, spatial_merge_size=2, temporal_patch_size=2,
                                                    deepstack_visual_indexes=[1], num_position_embeddings=64)),
    "qwen3_vl_moe": _qwen_like("qwen3_vl_moe", vision=dict(hidden_size=32, out_hidden_size=64, intermediate_size=64,
                                                            patch_size=4, spatial_merge_size=2, temporal_patch_size=2,
                                                            deepstack_visual_indexes=[1],
                                                            num_position_embeddings=64)),
    "llava_next": _custom("llava_next", _tiles(2), image_grid_pinpoints=[[32, 32], [32, 64], [64, 32]]),
    "llava_next_video": _custom("llava_next_video", _tiles(2), image_grid_pinpoints=[[32, 32], [32, 64], [64, 32]]),
    "llava_onevision": _custom("llava_onevision", _tiles(2), image_grid_pinpoints=[[32, 32], [32, 64], [64, 32]]),
    "mistral3": _custom("mistral3", _sized(), image_token_index=IMAGE_TOKEN),
    "lighton_ocr": _custom("lighton_ocr", _sized()),
    "idefics2": _custom("idefics2", lambda m: dict(pixel_values=_pixels().unsqueeze(1)),
                        perceiver_config=dict(hidden_size=64, resampler_n_latents=4, resampler_depth=1,
                                              resampler_n_heads=2, resampler_head_dim=8, num_key_value_heads=1)),
    "idefics3": _custom("idefics3", lambda m: dict(pixel_values=_pixels().unsqueeze(1)), scale_factor=2),
    "smolvlm": _custom("smolvlm", lambda m: dict(pixel_values=_pixels().unsqueeze(1)), scale_factor=2),
    "got_ocr2": _plain("got_ocr2", size=128, vision=dict(output_channels=16, image_size=128, patch_size=16,
                                                          window_size=4, global_attn_indexes=[1], mlp_dim=64)),
    "florence2": _plain("florence2", vision=dict(depths=[1], patch_size=[7], patch_stride=[4], patch_padding=[3],
                                                  patch_prenorm=[False], embed_dim=[32], num_heads=[1], num_groups=[1],
                                                  window_size=12, projection_dim=64)),
    "blip-2": _plain("blip-2", num_query_tokens=4, image_token_index=IMAGE_TOKEN,
                     qformer_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=64, encoder_hidden_size=32, vocab_size=1000)),
    "deepseek_vl_hybrid": _custom("deepseek_vl_hybrid",
                                  lambda m: dict(pixel_values=_pixels(), high_res_pixel_values=_pixels(128)),
                                  high_res_vision_config=dict(hidden_size=32, output_channels=16, num_hidden_layers=2,
                                                              num_attention_heads=4, image_size=128, patch_size=16,
                                                              window_size=4, global_attn_indexes=[1], mlp_dim=64)),
    "kimi_k25": _qwen_like("kimi_k25", grids=((1, 4, 4), (1, 4, 4)), projection_hidden_size=32, square_patches=True,
                           vision=dict(patch_size=8, pos_emb_height=4, pos_emb_width=4, pos_emb_time=1,
                                       merge_kernel_size=[2, 2]),
                           text=dict(kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=16, v_head_dim=32,
                                     num_key_value_heads=4, qk_nope_head_dim=32, n_group=1, topk_group=1)),
    "paddleocr_vl": _qwen_like("paddleocr_vl", grids=((1, 4, 4), (1, 4, 8)), square_patches=True,
                               vision=dict(patch_size=8, spatial_merge_size=2), text=MROPE),
    "glm4v": _qwen_like("glm4v", vision=dict(hidden_size=32, out_hidden_size=64, intermediate_size=64, patch_size=4,
                                              spatial_merge_size=2, temporal_patch_size=2, image_size=32), text=MROPE,
                        image_start_token_id=IMAGE_TOKEN + 2, image_end_token_id=IMAGE_TOKEN + 3),
    "glm4v_moe": _qwen_like("glm4v_moe", vision=dict(hidden_size=32, out_hidden_size=64, intermediate_size=64,
                                                      patch_size=4, spatial_merge_size=2, temporal_patch_size=2,
                                                      image_size=32),
                            text=dict(rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                                           mrope_section=[1, 1, 2], partial_rotary_factor=0.5)),
                            image_start_token_id=IMAGE_TOKEN + 2, image_end_token_id=IMAGE_TOKEN + 3),
    "fuyu": _custom("fuyu", lambda m: dict(pixel_values=torch.randn(BATCH, 16, 3 * 8 * 8)), patch_size=8,
                    image_size=32),
    "lfm2_vl": _custom("lfm2_vl", lambda m: dict(pixel_values=torch.randn(BATCH, 16, 3 * 8 * 8),
                                                 spatial_shapes=torch.tensor([[4, 4]] * BATCH),
                                                 pixel_attention_mask=torch.ones(BATCH, 16, dtype=torch.long)),
                       vision=dict(num_patches=16, patch_size=8), projector_hidden_size=64, downsample_factor=2),
    "mllama": _mllama,
    "llama4": _plain("llama4", vision=dict(vision_output_dim=64, projector_input_dim=64, projector_output_dim=64,
                                           intermediate_size=128, pixel_shuffle_ratio=0.5),
                     text=dict(intermediate_size_mlp=128, num_local_experts=2, interleave_moe_layer_step=1,
                               no_rope_layers=[1, 1])),
}


def llava_next_mixed_sizes() -> tuple[nn.Module, dict[str, Any]]:
    """LLaVA-NeXT with a 32×32 image (base + 1 tile) and a 32×64 image (base + 2 tiles): crops per image differ."""
    model = _model(tiny_config("llava_next", image_grid_pinpoints=[[32, 32], [32, 64], [64, 32]]))
    image = dict(pixel_values=_pixels().unsqueeze(1).expand(-1, 3, -1, -1, -1).contiguous(),
                 image_sizes=torch.tensor([[32, 32], [32, 64]]))
    return model, {**prompt(_measured(model, image), model.config.image_token_id), **image}


def build(family: str) -> tuple[nn.Module, dict[str, Any]]:
    """A tiny random model of `family` and a batch of two samples with one image each."""
    return BUILDERS[family]()
