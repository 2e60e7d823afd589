"""Vision-encoder plugins: HF CLIP / SigLIP wrappers and the from-scratch EVA-CLIP ViT-g of BLIP-2 (tiny configs)."""

from __future__ import annotations

import dataclasses
import importlib.util

import pytest
import torch
import torch.nn.functional as F

from cmoe import CMoEError
from cmoe.plugins.eva_clip import (
    EVACLIPEncoder,
    EVAViTConfig,
    build_eva_clip_g,
    interpolate_pos_embed,
    load_eva_checkpoint,
    load_eva_state_dict,
)
from cmoe.plugins.vision_encoders import VisionEncoder, build_hf_clip, build_hf_siglip

needs_hf = pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs transformers")

TINY_HF = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=28,
               patch_size=14)
TINY_EVA = dataclasses.asdict(EVAViTConfig.tiny())


def images(batch: int = 2, size: int = 28) -> torch.Tensor:
    return torch.randn(batch, 3, size, size)


# ---- Hugging Face encoders -------------------------------------------------------------------------------------


@needs_hf
@pytest.mark.parametrize("feature_layer", [-2, -1, 1])
@pytest.mark.parametrize("drop_cls", [True, False])
def test_hf_clip_shape_and_feature_layer(feature_layer: int, drop_cls: bool) -> None:
    encoder = build_hf_clip(config=TINY_HF, feature_layer=feature_layer, drop_cls=drop_cls)
    x = images()
    out = encoder(x)
    assert isinstance(encoder, VisionEncoder)
    assert encoder.out_features == 32 and encoder.image_size == 28
    assert encoder.num_patches == (4 if drop_cls else 5)
    assert out.shape == (2, encoder.num_patches, encoder.out_features)
    with torch.no_grad():
        reference = encoder.model(pixel_values=x, output_hidden_states=True).hidden_states[feature_layer]
    torch.testing.assert_close(out, reference[:, 1:] if drop_cls else reference, rtol=0, atol=0)


@needs_hf
def test_hf_clip_default_is_penultimate_layer_without_cls() -> None:
    encoder = build_hf_clip(config=TINY_HF)
    x = images()
    with torch.no_grad():
        hidden = encoder.model(pixel_values=x, output_hidden_states=True).hidden_states
    assert len(hidden) == TINY_HF["num_hidden_layers"] + 1
    torch.testing.assert_close(encoder(x), hidden[-2][:, 1:], rtol=0, atol=0)


@needs_hf
def test_hf_siglip_has_no_cls() -> None:
    encoder = build_hf_siglip(config=TINY_HF)
    x = images()
    out = encoder(x)
    assert encoder.num_patches == 4 and out.shape == (2, 4, 32)
    with torch.no_grad():
        reference = encoder.model(pixel_values=x, output_hidden_states=True).hidden_states[-2]
    torch.testing.assert_close(out, reference, rtol=0, atol=0)
    assert not hasattr(encoder.model, "head")
    with pytest.raises(CMoEError, match="drop_cls.*no CLS token"):
        build_hf_siglip(config=TINY_HF, drop_cls=True)


@needs_hf
@pytest.mark.parametrize("build", [build_hf_clip, build_hf_siglip])
def test_hf_round_trip_through_local_directory(build, tmp_path) -> None:
    encoder = build(config=TINY_HF)
    encoder.model.save_pretrained(tmp_path)
    loaded = build(path=str(tmp_path))
    x = images()
    torch.testing.assert_close(loaded(x), encoder(x), rtol=0, atol=0)
    assert not any(p.requires_grad for p in loaded.parameters())


@needs_hf
@pytest.mark.parametrize("build", [build_hf_clip, build_hf_siglip])
def test_hf_path_and_config_errors(build, tmp_path) -> None:
    with pytest.raises(CMoEError, match="exactly one"):
        build(path=str(tmp_path), config=TINY_HF)
    with pytest.raises(CMoEError, match="exactly one"):
        build()
    missing = tmp_path / "no-such-model"
    with pytest.raises(CMoEError, match="does not exist") as info:
        build(path=str(missing))
    assert str(missing) in str(info.value)
    with pytest.raises(CMoEError, match="cannot load"):
        build(path=str(tmp_path))
    with pytest.raises(CMoEError, match="feature_layer"):
        build(config=TINY_HF, feature_layer=4)
    with pytest.raises(CMoEError, match="config"):
        build(config={**TINY_HF, "hidden_size": "wide"})


# ---- EVA-CLIP ViT-g -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("drop_cls", [True, False])
@pytest.mark.parametrize("final_norm", [True, False])
def test_eva_shape(drop_cls: bool, final_norm: bool) -> None:
    encoder = build_eva_clip_g(config=TINY_EVA, drop_cls=drop_cls, final_norm=final_norm)
    out = encoder(images())
    assert encoder.out_features == 32 and encoder.image_size == 28
    assert encoder.num_patches == (4 if drop_cls else 5)
    assert out.shape == (2, encoder.num_patches, 32)
    assert (encoder.ln_vision is not None) == final_norm


def test_eva_feature_layer_and_final_norm() -> None:
    encoder = build_eva_clip_g(config=TINY_EVA, drop_cls=False, feature_layer=1)
    x = images()
    vit = encoder.visual_encoder
    with torch.no_grad():
        encoder.ln_vision.weight.normal_()
        encoder.ln_vision.bias.normal_()
        after_block_1 = vit.blocks[0](vit.embed(x))
        expected = F.layer_norm(after_block_1, (32,), encoder.ln_vision.weight, encoder.ln_vision.bias, 1e-5)
    torch.testing.assert_close(encoder(x), expected)
    last = build_eva_clip_g(config=TINY_EVA, final_norm=False)
    last.load_state_dict(encoder.state_dict(), strict=False)
    torch.testing.assert_close(last(x), vit(x)[:, 1:], rtol=0, atol=0)


def test_eva_attention_q_and_v_bias_k_unbiased() -> None:
    encoder = build_eva_clip_g(config=TINY_EVA)
    attn = encoder.visual_encoder.blocks[0].attn
    with torch.no_grad():
        attn.q_bias.normal_()
        attn.v_bias.normal_()
    x = torch.randn(2, 5, 32)
    wq, wk, wv = attn.qkv.weight.chunk(3)
    q, k, v = x @ wq.T + attn.q_bias, x @ wk.T, x @ wv.T + attn.v_bias

    def heads(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(2, 5, 2, 16).transpose(1, 2)

    weights = (heads(q) @ heads(k).transpose(-2, -1) / 16**0.5).softmax(-1)
    expected = attn.proj((weights @ heads(v)).transpose(1, 2).reshape(2, 5, 32))
    torch.testing.assert_close(attn(x), expected)
    assert attn.qkv.bias is None
    keys = encoder.state_dict().keys()
    assert "visual_encoder.blocks.0.attn.q_bias" in keys and "visual_encoder.blocks.0.attn.v_bias" in keys
    assert not any("k_bias" in key or "qkv.bias" in key for key in keys)


def lavis_state_dict(encoder: EVACLIPEncoder, extra_block: bool = False) -> dict[str, torch.Tensor]:
    """`encoder`'s weights as BLIP-2 stores them, plus other BLIP-2 modules, with fresh random values."""
    state = {key: torch.randn_like(value) for key, value in encoder.state_dict().items()}
    state["Qformer.bert.embeddings.word_embeddings.weight"] = torch.randn(4, 8)
    state["query_tokens"] = torch.randn(1, 32, 8)
    if extra_block:
        depth = encoder.config.depth
        state.update({key.replace(".blocks.0.", f".blocks.{depth}."): value.clone()
                      for key, value in state.items() if ".blocks.0." in key})
    return state


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_eva_loads_blip2_checkpoint_exactly(suffix: str, tmp_path) -> None:
    source = build_eva_clip_g(config=TINY_EVA)
    state = lavis_state_dict(source, extra_block=True)
    source.load_state_dict({k: v for k, v in state.items() if k in source.state_dict()})
    file = tmp_path / f"blip2{suffix}"
    if suffix == ".pth":
        torch.save({"model": state}, file)
    else:
        from safetensors.torch import save_file

        save_file(state, file)
    loaded = build_eva_clip_g(path=str(file), config=TINY_EVA)
    x = images()
    torch.testing.assert_close(loaded(x), source(x), rtol=0, atol=0)
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_eva_loads_bare_lavis_vit_and_keeps_fresh_ln_vision(tmp_path) -> None:
    source = build_eva_clip_g(config=TINY_EVA)
    bare = {key.removeprefix("visual_encoder."): value for key, value in lavis_state_dict(source).items()
            if key.startswith("visual_encoder.")}
    assert {"cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight",
            "blocks.1.mlp.fc2.bias"} <= bare.keys()
    file = tmp_path / "eva_vit_g.pth"
    torch.save(bare, file)
    loaded = build_eva_clip_g(path=str(file), config=TINY_EVA)
    assert torch.equal(loaded.visual_encoder.blocks[1].attn.v_bias, bare["blocks.1.attn.v_bias"])
    assert torch.equal(loaded.ln_vision.weight, torch.ones(32)) and torch.equal(loaded.ln_vision.bias, torch.zeros(32))


def test_eva_wrong_keys_are_listed() -> None:
    encoder = build_eva_clip_g(config=TINY_EVA)
    state = {key: value for key, value in lavis_state_dict(encoder).items() if key.startswith("visual_encoder.")}
    del state["visual_encoder.blocks.1.attn.q_bias"]
    state["visual_encoder.blocks.0.attn.k_bias"] = torch.zeros(32)
    state["visual_encoder.norm.weight"] = torch.ones(32)
    with pytest.raises(CMoEError) as info:
        load_eva_state_dict(encoder, state)
    message = str(info.value)
    assert "missing keys (1): visual_encoder.blocks.1.attn.q_bias" in message
    assert "visual_encoder.blocks.0.attn.k_bias" in message and "visual_encoder.norm.weight" in message
    wide = lavis_state_dict(build_eva_clip_g(config={**TINY_EVA, "embed_dim": 64}))
    with pytest.raises(CMoEError, match=r"shape mismatches .*visual_encoder.cls_token \(1, 1, 64\) vs \(1, 1, 32\)"):
        load_eva_state_dict(encoder, wide)


def test_eva_pos_embed_interpolated_to_larger_images() -> None:
    small = build_eva_clip_g(config=TINY_EVA)
    large = build_eva_clip_g(config={**TINY_EVA, "img_size": 56})
    load_eva_state_dict(large, small.state_dict())
    pos_small, pos_large = small.visual_encoder.pos_embed, large.visual_encoder.pos_embed
    assert pos_large.shape == (1, 17, 32)
    assert torch.equal(pos_large[:, 0], pos_small[:, 0])
    grid = pos_small[:, 1:].reshape(1, 2, 2, 32).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(4, 4), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).flatten(1, 2)
    torch.testing.assert_close(pos_large[:, 1:], expected)
    assert large(images(size=56)).shape == (2, 16, 32)
    assert interpolate_pos_embed(pos_small, 2) is pos_small


def test_eva_full_vit_g_is_one_billion_parameters_on_meta() -> None:
    with torch.device("meta"):
        encoder = EVACLIPEncoder(EVAViTConfig())
        out = encoder(torch.empty(1, 3, 224, 224))
    assert out.shape == (1, 256, 1408)
    assert encoder.num_patches == 256 and encoder.out_features == 1408
    block = 1408 * 3 * 1408 + 2 * 1408 + 1408 * 1408 + 1408 + 4 * 1408 + 1408 * 6144 + 6144 + 6144 * 1408 + 1408
    vit = 39 * block + 3 * 14 * 14 * 1408 + 1408 + 1408 + 257 * 1408
    assert sum(p.numel() for p in encoder.visual_encoder.parameters()) == vit == 985_894_528
    assert sum(p.numel() for p in encoder.parameters()) == vit + 2 * 1408


def test_eva_config_errors() -> None:
    with pytest.raises(CMoEError, match=r"config.*unknown \['width'\]"):
        build_eva_clip_g(config={**TINY_EVA, "width": 32})
    with pytest.raises(CMoEError, match="config.img_size"):
        build_eva_clip_g(config={**TINY_EVA, "img_size": 30})
    with pytest.raises(CMoEError, match="feature_layer"):
        build_eva_clip_g(config=TINY_EVA, feature_layer=-4)


def test_eva_checkpoint_path_errors(tmp_path) -> None:
    with pytest.raises(CMoEError, match="does not exist") as info:
        build_eva_clip_g(path=str(tmp_path / "eva_vit_g.pth"), config=TINY_EVA)
    assert "eva_vit_g.pth" in str(info.value)
    (tmp_path / "weights.npz").write_bytes(b"")
    with pytest.raises(CMoEError, match=r"\.safetensors"):
        build_eva_clip_g(path=str(tmp_path / "weights.npz"), config=TINY_EVA)


def test_eva_gradient_checkpointing_matches_plain_backward() -> None:
    x = images()
    plain = build_eva_clip_g(config=TINY_EVA, freeze=False).train()
    checkpointed = build_eva_clip_g(config={**TINY_EVA, "gradient_checkpointing": True}, freeze=False).train()
    checkpointed.load_state_dict(plain.state_dict())
    plain(x).square().sum().backward()
    checkpointed(x).square().sum().backward()
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


# ---- shared behaviour ------------------------------------------------------------------------------------------


BUILDERS = {
    "hf_clip": lambda **kw: build_hf_clip(config=TINY_HF, **kw),
    "hf_siglip": lambda **kw: build_hf_siglip(config=TINY_HF, **kw),
    "eva_clip_g": lambda **kw: build_eva_clip_g(config=TINY_EVA, **kw),
}
NAMES = [pytest.param(name, marks=needs_hf) if name.startswith("hf_") else name for name in BUILDERS]


@pytest.mark.parametrize("name", NAMES)
def test_frozen_by_default(name: str) -> None:
    encoder = BUILDERS[name]()
    assert not any(p.requires_grad for p in encoder.parameters())
    assert not encoder.train().training
    trainable = BUILDERS[name](freeze=False)
    assert all(p.requires_grad for p in trainable.parameters())
    assert trainable.train().training


@pytest.mark.parametrize("name", NAMES)
def test_bad_pixel_values(name: str) -> None:
    encoder = BUILDERS[name]()
    with pytest.raises(CMoEError, match=r"pixel_values: expected .*3 channels.*got 1 channels"):
        encoder(torch.randn(2, 1, 28, 28))
    with pytest.raises(CMoEError, match=r"pixel_values: expected .*28x28.*got 32x32"):
        encoder(torch.randn(2, 3, 32, 32))
    with pytest.raises(CMoEError, match=r"pixel_values: expected .*4-D.*got 3-D"):
        encoder(torch.randn(3, 28, 28))
    with pytest.raises(CMoEError, match="pixel_values.*dtype torch.int64"):
        encoder(torch.zeros(2, 3, 28, 28, dtype=torch.long))
    with pytest.raises(CMoEError, match="pixel_values.*list"):
        encoder([[0.0]])


def test_unset_variables_in_a_weights_path_are_named(monkeypatch: pytest.MonkeyPatch) -> None:
    from cmoe.errors import missing_path

    monkeypatch.delenv("CMOE_TEST_UNSET_A", raising=False)
    monkeypatch.delenv("CMOE_TEST_UNSET_B", raising=False)
    monkeypatch.setenv("CMOE_TEST_SET", "/x")
    assert missing_path("/m/eva.pth") == "'/m/eva.pth', which does not exist"
    assert missing_path("$CMOE_TEST_SET/${CMOE_TEST_UNSET_B}/$CMOE_TEST_UNSET_A", "is not a file").endswith(
        "which is not a file (the environment variables CMOE_TEST_UNSET_A, CMOE_TEST_UNSET_B are not set: "
        "export CMOE_TEST_UNSET_A=/path/to/the/local/files)")
    with pytest.raises(CMoEError, match=r"\$\{CMOE_TEST_UNSET_A\}/eva.pth', which does not exist \(the environment "
                                        r"variable CMOE_TEST_UNSET_A is not set"):
        load_eva_checkpoint("${CMOE_TEST_UNSET_A}/eva.pth")
