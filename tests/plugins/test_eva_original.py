"""The EVA-CLIP-g plugin against the ORIGINAL Uni-Med EVA ViT (``uni_med/models/eva_vit.py``), on golden files.

The golden files (tests/data/unimed_original_eva/: golden.json, golden.safetensors) come from running
tsinghua-msiip/Uni-Med @63b9dfb unchanged in the scratch venv of tests/golden/original_venv.sh (timm 0.6.13):
tests/golden/make_eva_golden.py builds the vision encoder through the original's own
``BaseModel.init_vision_encoder`` / ``create_eva_vit_g`` at a tiny size (16 wide, 2 blocks of 2 heads, MLP 69,
14 px patches, 42 px images; golden.json's "produced_by" lists the harness patches), from a tiny checkpoint in
LAVIS ``eva_vit_g.pth``'s bare key layout with seeded random weights and one block more than the model (as the
40-block file has for 39). Here the same checkpoint goes through our loader, and our encoder must give the
original's outputs in float32: the raw ViT tokens, ``ln_vision`` on top, Uni-Med's features (``encode_img``: CLS
dropped, what the connector gets), and the 56 px model whose ``pos_embed`` the original interpolates (3x3 -> 4x4).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from cmoe.plugins.eva_clip import (
    LN_VISION_EPS,
    EVAViTConfig,
    build_eva_clip_g,
    interpolate_pos_embed,
    load_eva_state_dict,
)
from cmoe.registry import get_vision_encoder

GOLDEN_DIR = Path(__file__).resolve().parents[1] / "data" / "unimed_original_eva"
GOLDEN = json.loads((GOLDEN_DIR / "golden.json").read_text(encoding="utf-8"))
TENSORS = load_file(str(GOLDEN_DIR / "golden.safetensors"))
CHECKPOINT = {key.removeprefix("checkpoint/"): value for key, value in TENSORS.items()
              if key.startswith("checkpoint/")}
_C = GOLDEN["config"]
CONFIG = {name: _C[name] for name in ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio")}
LARGE = {**CONFIG, "img_size": _C["large_img_size"]}
TOL = dict(rtol=1e-5, atol=1e-6)
"""Raw ViT tokens (std ~0.12) and pos_embed. Measured: at most 7.5e-8 apart (pos_embed: equal)."""
NORMED_TOL = dict(rtol=1e-5, atol=1e-5)
"""Outputs of ln_vision (std ~1: the same tolerance relative to their scale; LayerNorm divides by std ~0.12, which
scales the tokens' rounding up). Measured: at most 7.2e-7 apart. Smallest mutation caught: ln_vision eps 1e-6
instead of 1e-5 moves them by 9.4e-4."""


def images(size: str) -> torch.Tensor:
    return TENSORS[f"images/{size}"].float()  # stored float16, exactly the float32 values the original ran on


@pytest.fixture(scope="module")
def checkpoint_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The golden checkpoint as a LAVIS-style ``eva_vit_g.pth`` (a bare state dict saved by torch.save)."""
    path = tmp_path_factory.mktemp("eva") / "eva_vit_g.pth"
    torch.save(CHECKPOINT, path)
    return str(path)


def encode(encoder: nn.Module, size: str) -> torch.Tensor:
    with torch.no_grad():
        return encoder(images(size))


def test_golden_describes_our_architecture() -> None:
    """The tiny config is one both sides accept, with the original's MLP width, eps values and extra block."""
    config = EVAViTConfig(**CONFIG)
    assert GOLDEN["commit"] == "63b9dfb0db31e61afcb381865225d69518377f3d"
    assert config.mlp_hidden == _C["mlp_hidden"] == CHECKPOINT["blocks.0.mlp.fc1.weight"].shape[0]
    assert config.norm_eps == _C["norm_eps"] and LN_VISION_EPS == _C["ln_vision_eps"]
    assert config.qkv_bias is _C["qkv_bias"]
    blocks = {int(key.split(".")[1]) for key in CHECKPOINT if key.startswith("blocks.")}
    assert blocks == set(range(_C["checkpoint_depth"])) and _C["checkpoint_depth"] == config.depth + 1
    call = GOLDEN["vision_transformer_calls"][0]  # what create_eva_vit_g passes (before the harness's resizing)
    full = EVAViTConfig()
    assert (call["patch_size"], call["embed_dim"], call["depth"], call["num_heads"], call["mlp_ratio"]) == (
        full.patch_size, full.embed_dim, full.depth, full.num_heads, full.mlp_ratio)
    assert call["qkv_bias"] is True and call["use_mean_pooling"] is False and "eps=1e-06" in call["norm_layer"]


def test_loaded_weights_are_the_checkpoint_minus_the_extra_block(checkpoint_path: str) -> None:
    encoder = build_eva_clip_g(path=checkpoint_path, config=CONFIG, final_norm=False)
    ours = encoder.visual_encoder.state_dict()
    ignored = sorted(set(CHECKPOINT) - set(ours))
    assert ignored == GOLDEN["load"]["ignored_by_strict_false"]
    for key, value in ours.items():
        assert torch.equal(value, CHECKPOINT[key]), key


def test_vit_tokens(checkpoint_path: str) -> None:
    """VisionTransformer.forward: all tokens, CLS first, no norm."""
    encoder = build_eva_clip_g(path=checkpoint_path, config=CONFIG, drop_cls=False, final_norm=False)
    torch.testing.assert_close(encode(encoder, "small"), TENSORS["tokens/small"], **TOL)


def test_ln_vision(checkpoint_path: str) -> None:
    """Uni-Med's ln_vision (base_model.LayerNorm, eps 1e-5, fresh weight 1 / bias 0, float32) on all tokens."""
    encoder = build_eva_clip_g(path=checkpoint_path, config=CONFIG, drop_cls=False, final_norm=True)
    torch.testing.assert_close(encode(encoder, "small"), TENSORS["ln_vision/small"], **NORMED_TOL)


def test_ln_vision_affine() -> None:
    """ln_vision's weight and bias applied as base_model.LayerNorm applies them (BLIP-2-style keys)."""
    encoder = build_eva_clip_g(config=CONFIG, drop_cls=False, final_norm=True)
    state = {f"visual_encoder.{key}": value for key, value in CHECKPOINT.items()}
    state["ln_vision.weight"] = TENSORS["ln_vision_random/weight"]
    state["ln_vision.bias"] = TENSORS["ln_vision_random/bias"]
    load_eva_state_dict(encoder, state)
    torch.testing.assert_close(encode(encoder, "small"), TENSORS["ln_vision_random/small"], **NORMED_TOL)


def test_recipe_features(checkpoint_path: str) -> None:
    """What the connector gets: the recipe builds ``eva_clip_g`` with its defaults (``drop_cls``, ``final_norm``,
    last block) as the paper config does (options: path), and the original's ``encode_img`` takes
    ``ln_vision(visual_encoder(image))[:, 1:, :]``."""
    encoder = get_vision_encoder("eva_clip_g")(path=checkpoint_path, config=CONFIG)
    assert encoder.num_patches == TENSORS["features/small"].shape[1] == (_C["img_size"] // _C["patch_size"]) ** 2
    torch.testing.assert_close(encode(encoder, "small"), TENSORS["features/small"], **NORMED_TOL)


def test_interpolated_pos_embed(checkpoint_path: str) -> None:
    """The original's interpolate_pos_embed (bicubic, align_corners=False, CLS kept) for a larger grid."""
    grid = _C["large_img_size"] // _C["patch_size"]
    torch.testing.assert_close(interpolate_pos_embed(CHECKPOINT["pos_embed"], grid), TENSORS["pos_embed/large"],
                               **TOL)
    encoder = build_eva_clip_g(path=checkpoint_path, config=LARGE)
    torch.testing.assert_close(encoder.visual_encoder.pos_embed.detach(), TENSORS["pos_embed/large"], **TOL)


def test_interpolated_model(checkpoint_path: str) -> None:
    """The 56 px model loaded from the 42 px checkpoint: raw tokens and Uni-Med's features."""
    raw = build_eva_clip_g(path=checkpoint_path, config=LARGE, drop_cls=False, final_norm=False)
    torch.testing.assert_close(encode(raw, "large"), TENSORS["tokens/large"], **TOL)
    features = build_eva_clip_g(path=checkpoint_path, config=LARGE)
    torch.testing.assert_close(encode(features, "large"), TENSORS["features/large"], **NORMED_TOL)


def test_fp16_parameter_set_matches_conv_and_linear() -> None:
    """The original's convert_weights_to_fp16 (vit_precision: fp16) halves exactly the Conv2d/Linear weights and
    biases; ours has no such path (the recipe keeps the encoder float32, autocast does the rest), but the same
    parameters are the Conv2d/Linear ones here, so ``q_bias``/``v_bias``, LayerNorms, ``cls_token`` and
    ``pos_embed`` are the ones the original keeps in float32."""
    vit = build_eva_clip_g(config=CONFIG, final_norm=False).visual_encoder
    linear = {f"{module_name}.{name}" for module_name, module in vit.named_modules()
              if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Linear)) for name, _ in module.named_parameters()}
    assert sorted(linear) == GOLDEN["fp16"]["converted"]
    assert sorted(set(dict(vit.named_parameters())) - linear) == GOLDEN["fp16"]["kept_float32"]
