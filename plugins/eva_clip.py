"""EVA-CLIP ViT-g/14 as BLIP-2 / LAVIS / MiniGPT-v2 use it (the vision encoder of Uni-Med), in plain PyTorch.

Architecture (LAVIS ``lavis/models/eva_vit.py``, ``create_eva_vit_g``): 224 px images cut into 14 px patches
(a 16x16 grid), a CLS token and learned absolute position embeddings, then 39 pre-norm blocks of width 1408,
16 heads of 88, MLP 6144 with exact (erf) GELU, LayerNorm eps 1e-6. The qkv projection has no bias of its own:
q and v get the learned ``q_bias`` / ``v_bias`` and k gets none (zero). No relative position bias, no layer
scale, no final norm inside the ViT. The public EVA-CLIP-g checkpoint has 40 blocks; BLIP-2 builds 39 and loads
it non-strictly, dropping the last block, so the features are the output of block 39. BLIP-2 and MiniGPT-v2
then apply a separate ``ln_vision = LayerNorm(1408)`` (PyTorch's default eps 1e-5, computed in float32), here
``final_norm``. Stochastic depth (drop path) is not implemented: it is the identity at inference and the
encoder is frozen.

State-dict keys of `EVACLIPEncoder` (the module `build_eva_clip_g` returns) are BLIP-2's own:

    ============================================  ==============================================
    checkpoint key                                 key here
    ============================================  ==============================================
    LAVIS ``eva_vit_g.pth``: ``<k>``               ``visual_encoder.<k>``
    BLIP-2 / MiniGPT: ``visual_encoder.<k>``       ``visual_encoder.<k>`` (unchanged)
    BLIP-2 / MiniGPT: ``ln_vision.weight|bias``    ``ln_vision.weight|bias`` (unchanged)
    ============================================  ==============================================

with ``<k>`` one of ``cls_token``, ``pos_embed``, ``patch_embed.proj.{weight,bias}`` and, per block i,
``blocks.<i>.norm1.{weight,bias}``, ``blocks.<i>.attn.qkv.weight``, ``blocks.<i>.attn.q_bias``,
``blocks.<i>.attn.v_bias``, ``blocks.<i>.attn.proj.{weight,bias}``, ``blocks.<i>.norm2.{weight,bias}``,
``blocks.<i>.mlp.fc1.{weight,bias}``, ``blocks.<i>.mlp.fc2.{weight,bias}``. See `load_eva_state_dict` for how
checkpoints are unwrapped and which differences are tolerated.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from cmoe.errors import CMoEError, expect, missing_path
from cmoe.plugins.vision_encoders import VisionEncoder, resolve_feature_layer

__all__ = [
    "EVAAttention",
    "EVABlock",
    "EVACLIPEncoder",
    "EVAViTConfig",
    "EVAVisionTransformer",
    "build_eva_clip_g",
    "interpolate_pos_embed",
    "load_eva_checkpoint",
    "load_eva_state_dict",
]

logger = logging.getLogger(__name__)

LN_VISION_EPS = 1e-5
"""eps of BLIP-2's ``ln_vision`` (a default ``nn.LayerNorm``), unlike the ViT's own 1e-6."""


@dataclass
class EVAViTConfig:
    """Shape of an EVA ViT; the defaults are BLIP-2's EVA-CLIP ViT-g/14 (about 1.0B parameters).

    `gradient_checkpointing` recomputes each block in the backward pass (only when training with gradients).
    """

    img_size: int = 224
    patch_size: int = 14
    in_chans: int = 3
    embed_dim: int = 1408
    depth: int = 39
    num_heads: int = 16
    mlp_ratio: float = 4.3637
    qkv_bias: bool = True
    norm_eps: float = 1e-6
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        for name in ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads"):
            value = getattr(self, name)
            expect(isinstance(value, int) and not isinstance(value, bool) and value > 0, f"config.{name}",
                   "a positive int", repr(value))
        expect(self.img_size % self.patch_size == 0, "config.img_size",
               f"a multiple of patch_size={self.patch_size}", self.img_size)
        expect(self.embed_dim % self.num_heads == 0, "config.embed_dim",
               f"a multiple of num_heads={self.num_heads}", self.embed_dim)
        expect(isinstance(self.mlp_ratio, (int, float)) and self.mlp_ratio > 0, "config.mlp_ratio",
               "a positive number", repr(self.mlp_ratio))

    @classmethod
    def tiny(cls, **overrides: object) -> EVAViTConfig:
        """A few-thousand-parameter config of the same architecture, for tests (28 px, 2x2 grid)."""
        fields = dict(img_size=28, patch_size=14, embed_dim=32, depth=2, num_heads=2, mlp_ratio=4.3637)
        return cls(**{**fields, **overrides})

    @classmethod
    def from_dict(cls, config: Mapping[str, object]) -> EVAViTConfig:
        """A config from a dict of field values; unknown names raise `CMoEError` listing the known ones."""
        expect(isinstance(config, Mapping), "config", "a dict of EVAViTConfig fields", type(config).__name__)
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(config) - set(known))
        expect(not unknown, "config", f"EVAViTConfig fields ({', '.join(known)})", f"unknown {unknown}")
        return cls(**config)

    @property
    def grid_size(self) -> int:
        """Patches per side."""
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        """Patch tokens per image (without CLS)."""
        return self.grid_size**2

    @property
    def mlp_hidden(self) -> int:
        """MLP width, ``int(embed_dim * mlp_ratio)`` as in EVA (6144 for ViT-g)."""
        return int(self.embed_dim * self.mlp_ratio)


class EVAAttention(nn.Module):
    """Multi-head self-attention with one bias-free qkv matrix plus learned q and v biases (k has none)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        if qkv_bias:
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.v_bias = nn.Parameter(torch.zeros(dim))
        else:
            self.register_parameter("q_bias", None)
            self.register_parameter("v_bias", None)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        """Self-attention of tokens ``x [B, N, D]``."""
        batch, tokens, dim = x.shape
        bias = None
        if self.q_bias is not None:
            bias = torch.cat((self.q_bias, torch.zeros_like(self.q_bias), self.v_bias))
        qkv = F.linear(x, self.qkv.weight, bias).reshape(batch, tokens, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class EVAMlp(nn.Module):
    """fc1 → exact GELU → fc2."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class EVABlock(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(self, config: EVAViTConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.embed_dim, eps=config.norm_eps)
        self.attn = EVAAttention(config.embed_dim, config.num_heads, config.qkv_bias)
        self.norm2 = nn.LayerNorm(config.embed_dim, eps=config.norm_eps)
        self.mlp = EVAMlp(config.embed_dim, config.mlp_hidden)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class EVAPatchEmbed(nn.Module):
    """Non-overlapping patches projected to tokens by a strided convolution (``patch_embed.proj``)."""

    def __init__(self, config: EVAViTConfig):
        super().__init__()
        self.proj = nn.Conv2d(config.in_chans, config.embed_dim, kernel_size=config.patch_size,
                              stride=config.patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class EVAVisionTransformer(nn.Module):
    """The EVA ViT of BLIP-2 with LAVIS's parameter names; returns all tokens, CLS first, without final norm."""

    def __init__(self, config: EVAViTConfig):
        super().__init__()
        self.config = config
        self.patch_embed = EVAPatchEmbed(config)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_patches + 1, config.embed_dim))
        self.blocks = nn.ModuleList(EVABlock(config) for _ in range(config.depth))
        self.gradient_checkpointing = config.gradient_checkpointing
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """EVA's random init: truncated normal (std 0.02), zero biases, and output projections of block i
        scaled by ``1 / sqrt(2 i)``."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        for layer_id, block in enumerate(self.blocks, start=1):
            block.attn.proj.weight.div_(math.sqrt(2.0 * layer_id))
            block.mlp.fc2.weight.div_(math.sqrt(2.0 * layer_id))

    def embed(self, pixel_values: Tensor) -> Tensor:
        """Patch tokens with the CLS token prepended and position embeddings added: ``[B, 1 + N, D]``."""
        x = self.patch_embed(pixel_values)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        return x + self.pos_embed

    def forward(self, pixel_values: Tensor, num_blocks: int | None = None) -> Tensor:
        """Tokens ``[B, 1 + N, D]`` after the first `num_blocks` blocks (all of them by default)."""
        x = self.embed(pixel_values)
        use_checkpoint = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks[:num_blocks]:
            x = checkpoint(block, x, use_reentrant=False) if use_checkpoint else block(x)
        return x


class EVACLIPEncoder(VisionEncoder):
    """`EVAVisionTransformer` (``visual_encoder``) plus BLIP-2's optional ``ln_vision`` as a `VisionEncoder`.

    Output: hidden state `feature_layer` (0 = embeddings, i = block i, -1 = last block), normalised by
    ``ln_vision`` when `final_norm`, without the CLS token when `drop_cls`. Blocks after the selected one are
    kept (so checkpoints load unchanged) but not run.
    """

    def __init__(self, config: EVAViTConfig, drop_cls: bool = True, final_norm: bool = True,
                 feature_layer: int = -1):
        expect(isinstance(drop_cls, bool), "drop_cls", "a bool", repr(drop_cls))
        expect(isinstance(final_norm, bool), "final_norm", "a bool", repr(final_norm))
        layer_index = resolve_feature_layer(feature_layer, config.depth)
        super().__init__(config.embed_dim, config.img_size, config.num_patches + (0 if drop_cls else 1),
                         config.in_chans)
        self.config = config
        self.drop_cls = drop_cls
        self.feature_layer = feature_layer
        self.layer_index = layer_index
        self.visual_encoder = EVAVisionTransformer(config)
        self.ln_vision = nn.LayerNorm(config.embed_dim, eps=LN_VISION_EPS) if final_norm else None

    def encode(self, pixel_values: Tensor) -> Tensor:
        """Features of `pixel_values` (cast to the ViT's dtype); ``ln_vision`` runs in float32 as in BLIP-2."""
        dtype = self.visual_encoder.patch_embed.proj.weight.dtype
        x = self.visual_encoder(pixel_values.to(dtype), num_blocks=self.layer_index)
        if self.ln_vision is not None:
            x = F.layer_norm(x.float(), self.ln_vision.normalized_shape, self.ln_vision.weight.float(),
                             self.ln_vision.bias.float(), self.ln_vision.eps).to(x.dtype)
        return x[:, 1:] if self.drop_cls else x

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, feature_layer={self.feature_layer}, drop_cls={self.drop_cls}"


def interpolate_pos_embed(pos_embed: Tensor, grid_size: int) -> Tensor:
    """`pos_embed` ``[1, 1 + g*g, D]`` resized to a `grid_size` grid: CLS kept, patch part bicubic-interpolated
    (in float32, ``align_corners=False``, as LAVIS does), so a 224 px checkpoint serves e.g. 448 px images."""
    expect(pos_embed.dim() == 3 and pos_embed.shape[0] == 1, "pos_embed", "a tensor [1, 1 + g*g, D]",
           tuple(pos_embed.shape))
    old_grid = math.isqrt(pos_embed.shape[1] - 1)
    expect(old_grid * old_grid == pos_embed.shape[1] - 1, "pos_embed", "1 CLS position plus a square grid",
           f"{pos_embed.shape[1]} positions")
    if old_grid == grid_size:
        return pos_embed
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
    patch_pos = patch_pos.float().reshape(1, old_grid, old_grid, -1).permute(0, 3, 1, 2)
    patch_pos = F.interpolate(patch_pos, size=(grid_size, grid_size), mode="bicubic", align_corners=False)
    patch_pos = patch_pos.permute(0, 2, 3, 1).flatten(1, 2).to(pos_embed.dtype)
    return torch.cat((cls_pos, patch_pos), dim=1)


_BLOCK_KEY = re.compile(r"^visual_encoder\.blocks\.(\d+)\.")


def _block_index(key: str) -> int:
    """The block number in a ``visual_encoder.blocks.<i>.*`` key, -1 for other keys."""
    match = _BLOCK_KEY.match(key)
    return int(match.group(1)) if match else -1


def _shown(keys: list[str], limit: int = 12) -> str:
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _normalise_keys(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """BLIP-2 naming (``visual_encoder.*``, ``ln_vision.*``) for a LAVIS, BLIP-2 or MiniGPT checkpoint."""
    if any(key.startswith("visual_encoder.") for key in state_dict):
        return {key: value for key, value in state_dict.items()
                if key.startswith("visual_encoder.") or key.startswith("ln_vision.")}
    return {key if key.startswith("ln_vision.") else f"visual_encoder.{key}": value
            for key, value in state_dict.items()}


def load_eva_state_dict(encoder: EVACLIPEncoder, state_dict: Mapping[str, Tensor]) -> None:
    """Load an EVA-CLIP-g state dict into `encoder`: strict, except for the BLIP-2 habits listed below.

    Accepted: LAVIS's bare ViT keys (``cls_token``, ``blocks.0.attn.q_bias``, ...), BLIP-2 / MiniGPT keys
    (``visual_encoder.*`` and ``ln_vision.*``; the rest of such a checkpoint — Q-Former, LLM projection — is
    ignored), or either wrapped as ``{"model": ...}``. Tolerated: blocks beyond ``config.depth`` are dropped
    (BLIP-2 loads the 40-block EVA-CLIP-g into 39 blocks); missing ``ln_vision.*`` keeps a fresh LayerNorm
    (weight 1, bias 0, which is what MiniGPT-v2 / Uni-Med use), and ``ln_vision.*`` is ignored when
    ``final_norm`` is off; a ``pos_embed`` of another grid is interpolated (`interpolate_pos_embed`).
    Anything else missing, unexpected or of the wrong shape raises `CMoEError` listing the keys.
    """
    expect(isinstance(state_dict, Mapping), "state_dict", "a mapping of str keys to tensors",
           type(state_dict).__name__)
    if isinstance(state_dict.get("model"), Mapping):
        state_dict = state_dict["model"]
    bad = [repr(key) for key, value in state_dict.items() if not isinstance(key, str) or not isinstance(value, Tensor)]
    expect(not bad, "state_dict", "a mapping of str keys to tensors", f"other entries {_shown(bad)}")
    weights = _normalise_keys(state_dict)
    depth = encoder.config.depth
    dropped = sorted({_block_index(key) for key in weights if _block_index(key) >= depth})
    if dropped:
        logger.info("EVA checkpoint: dropping blocks %s beyond depth=%d (as BLIP-2 does)", dropped, depth)
        weights = {key: value for key, value in weights.items() if _block_index(key) < depth}
    if encoder.ln_vision is None:
        weights = {key: value for key, value in weights.items() if not key.startswith("ln_vision.")}
    if "visual_encoder.pos_embed" in weights:
        weights["visual_encoder.pos_embed"] = interpolate_pos_embed(weights["visual_encoder.pos_embed"],
                                                                    encoder.config.grid_size)
    own = encoder.state_dict()
    has_ln_vision = any(key.startswith("ln_vision.") for key in weights)
    missing = [key for key in own if key not in weights and (has_ln_vision or not key.startswith("ln_vision."))]
    unexpected = [key for key in weights if key not in own]
    mismatched = [f"{key} {tuple(weights[key].shape)} vs {tuple(own[key].shape)}" for key in own
                  if key in weights and weights[key].shape != own[key].shape]
    problems = [f"{label} ({len(keys)}): {_shown(keys)}" for label, keys in
                (("missing keys", missing), ("unexpected keys", unexpected),
                 ("shape mismatches (checkpoint vs model)", mismatched)) if keys]
    if problems:
        raise CMoEError("state_dict: expected an EVA ViT checkpoint matching the config (keys named as in LAVIS "
                        "eva_vit.py, optionally prefixed 'visual_encoder.', plus 'ln_vision.*'), got "
                        + "; ".join(problems))
    if encoder.ln_vision is not None and not has_ln_vision:
        logger.info("EVA checkpoint has no ln_vision.*: keeping a fresh LayerNorm (weight 1, bias 0)")
    encoder.load_state_dict(weights, strict=False)


def load_eva_checkpoint(path: str | os.PathLike) -> Mapping[str, Tensor]:
    """The tensors of a LOCAL ``.safetensors`` or ``.pth`` / ``.pt`` / ``.bin`` file (``weights_only`` load)."""
    expect(isinstance(path, (str, os.PathLike)), "path", "a local checkpoint file (str)", repr(path))
    path = os.fspath(path)
    expect(os.path.isfile(path), "path", "an existing local .pth/.pt/.bin/.safetensors file",
           lambda: missing_path(path, "is not a file" if os.path.exists(path) else "does not exist"))
    suffix = os.path.splitext(path)[1].lower()
    expect(suffix in (".safetensors", ".pth", ".pt", ".bin"), "path",
           "a .pth, .pt, .bin or .safetensors file", repr(path))
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(path, device="cpu")
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CMoEError(f"path: cannot read the checkpoint {path!r}: {error}") from error


def build_eva_clip_g(path: str | None = None, config: dict | EVAViTConfig | None = None, drop_cls: bool = True,
                     final_norm: bool = True, freeze: bool = True, feature_layer: int = -1) -> EVACLIPEncoder:
    """BLIP-2's EVA-CLIP ViT-g/14 (+ ``ln_vision``) as a `VisionEncoder`: ``[B, 256, 1408]`` at 224 px.

    `config` (a dict of `EVAViTConfig` fields, or an `EVAViTConfig`) sets the architecture; fields left out
    keep the ViT-g defaults, so with no config this builds the full ViT-g: about 1.0B parameters (4 GB in
    float32; random init takes a while on CPU). `path` is an optional LOCAL checkpoint (`load_eva_checkpoint`)
    loaded by `load_eva_state_dict`; without it the weights are random. Both may be given, e.g.
    ``config={"img_size": 448}`` with BLIP-2's 224 px weights (MiniGPT-v2), whose position embeddings are then
    interpolated. With a checkpoint the model is built on the meta device and skips the random init; built inside
    a meta device context (the recipe's `model.memory.build_on_meta`) it stays there, without reading the
    checkpoint.
    """
    if not isinstance(config, EVAViTConfig):
        config = EVAViTConfig.from_dict({} if config is None else config)
    options = dict(drop_cls=drop_cls, final_norm=final_norm, feature_layer=feature_layer)
    if path is None or torch.empty(()).is_meta:  # inside a meta device context the checkpoint is not read
        encoder = EVACLIPEncoder(config, **options)
    else:
        weights = load_eva_checkpoint(path)
        with torch.device("meta"):
            encoder = EVACLIPEncoder(config, **options)
        encoder.to_empty(device="cpu")
        if encoder.ln_vision is not None:
            encoder.ln_vision.reset_parameters()
        load_eva_state_dict(encoder, weights)
    return encoder.freeze() if freeze else encoder
