"""Vision encoders that turn images into patch tokens for the connector: a common base and Hugging Face wrappers.

Every encoder maps ``pixel_values [B, 3, H, W]`` (already resized and normalised, H = W = ``image_size``) to
patch features ``[B, num_patches, out_features]``. Encoders are frozen by default, as in Uni-Med / MiniGPT-v2,
where only the connector (and the LLM's LoRA) are trained.

Builders (registered by ``plugins/plugin.py``):

* ``build_hf_clip``   — ``transformers.CLIPVisionModel``, LLaVA's convention: penultimate layer, CLS dropped.
* ``build_hf_siglip`` — ``transformers.SiglipVisionModel`` (no CLS token).
* ``cmoe.plugins.eva_clip.build_eva_clip_g`` — BLIP-2's EVA-CLIP ViT-g/14, the encoder Uni-Med uses.

Nothing here downloads weights: a model comes from a LOCAL directory or from a config with random weights.
"""

from __future__ import annotations

import os
from typing import Any

from torch import Tensor, nn

from cmoe.errors import CMoEError, expect, missing_path
from cmoe.extras import require
from cmoe.plugins.hf_local import local_load_options

__all__ = ["HFVisionEncoder", "VisionEncoder", "build_hf_clip", "build_hf_siglip", "resolve_feature_layer"]


class VisionEncoder(nn.Module):
    """Base of all vision encoders: checks the input, then `encode`s it to ``[B, num_patches, out_features]``.

    Subclasses set `out_features` (D), `image_size` (H = W) and `num_patches` (N, tokens per image after an
    optional CLS drop) and implement `encode`. A frozen encoder (see `freeze`) stays in eval mode even when a
    parent module calls ``.train()``, like MiniGPT-4's ``disabled_train``.
    """

    def __init__(self, out_features: int, image_size: int, num_patches: int, num_channels: int = 3):
        super().__init__()
        self.out_features = int(out_features)
        self.image_size = int(image_size)
        self.num_patches = int(num_patches)
        self.num_channels = int(num_channels)
        self.frozen = False

    def forward(self, pixel_values: Tensor) -> Tensor:
        """Patch features ``[B, num_patches, out_features]`` of images ``pixel_values [B, 3, H, W]``."""
        self.check_input(pixel_values)
        return self.encode(pixel_values)

    def encode(self, pixel_values: Tensor) -> Tensor:
        """The features of already-validated `pixel_values`; implemented by each encoder."""
        raise NotImplementedError(f"{type(self).__name__} must implement encode()")

    def check_input(self, pixel_values: Tensor) -> None:
        """Raise `CMoEError` unless `pixel_values` is a float tensor [B, C, image_size, image_size]."""
        size, channels = self.image_size, self.num_channels
        expected = f"a float tensor [B, {channels}, {size}, {size}]"
        expect(isinstance(pixel_values, Tensor), "pixel_values", expected, type(pixel_values).__name__)
        shape = tuple(pixel_values.shape)
        expect(pixel_values.dim() == 4, "pixel_values", f"{expected} (4-D)", f"{pixel_values.dim()}-D shape {shape}")
        expect(shape[1] == channels, "pixel_values", f"{expected} ({channels} channels)",
               f"{shape[1]} channels in shape {shape}")
        expect(shape[2] == size and shape[3] == size, "pixel_values",
               f"{expected} (images of {size}x{size}; resize them first)", f"{shape[2]}x{shape[3]} in shape {shape}")
        expect(pixel_values.is_floating_point(), "pixel_values", expected, f"dtype {pixel_values.dtype}")

    def freeze(self) -> VisionEncoder:
        """Stop training the encoder: no parameter requires grad and the module stays in eval mode."""
        for parameter in self.parameters():
            parameter.requires_grad_(False)
        self.frozen = True
        return self.eval()

    def unfreeze(self) -> VisionEncoder:
        """Make every parameter trainable again and let ``.train()`` switch modes as usual."""
        for parameter in self.parameters():
            parameter.requires_grad_(True)
        self.frozen = False
        return self

    def train(self, mode: bool = True) -> VisionEncoder:
        """Switch train/eval mode; a frozen encoder ignores ``train(True)`` and stays in eval mode."""
        return super().train(mode and not self.frozen)

    def extra_repr(self) -> str:
        return (f"out_features={self.out_features}, image_size={self.image_size}, num_patches={self.num_patches}, "
                f"frozen={self.frozen}")


def resolve_feature_layer(feature_layer: int, num_layers: int) -> int:
    """The non-negative index of `feature_layer` among the ``num_layers + 1`` hidden states.

    Hidden state 0 is the embedding output (the input of layer 1) and hidden state i the output of layer i, as
    in Hugging Face's ``output_hidden_states``; negative values count from the end (-1 = last layer).
    """
    count = num_layers + 1
    expect(isinstance(feature_layer, int) and not isinstance(feature_layer, bool) and -count <= feature_layer < count,
           "feature_layer", f"an int in [-{count}, {count - 1}] (the model has {num_layers} layers; "
           "0 = embeddings, -1 = last layer, -2 = penultimate)", repr(feature_layer))
    return feature_layer % count


def _square(value: Any, name: str) -> int:
    """One side of a square `image_size` / `patch_size` given as an int or a pair."""
    if isinstance(value, (list, tuple)):
        expect(len(value) == 2 and value[0] == value[1], name, "an int or a square (n, n) pair", repr(value))
        value = value[0]
    expect(isinstance(value, int) and value > 0, name, "a positive int", repr(value))
    return value


class HFVisionEncoder(VisionEncoder):
    """A Hugging Face vision tower (`model`) returning one of its hidden states, optionally without CLS.

    Only the selected hidden state is kept during the forward pass (transformers >= 5 honours an index list in
    ``output_hidden_states``; older versions return all of them, which gives the same result).
    """

    def __init__(self, model: nn.Module, feature_layer: int, drop_cls: bool, has_cls: bool):
        config = model.config
        image_size = _square(config.image_size, "config.image_size")
        patch_size = _square(config.patch_size, "config.patch_size")
        expect(image_size % patch_size == 0, "config.image_size",
               f"a multiple of patch_size={patch_size}", image_size)
        expect(isinstance(drop_cls, bool), "drop_cls", "a bool", repr(drop_cls))
        grid = image_size // patch_size
        num_patches = grid * grid + (1 if has_cls and not drop_cls else 0)
        super().__init__(config.hidden_size, image_size, num_patches, getattr(config, "num_channels", 3))
        self.model = model
        self.layer_index = resolve_feature_layer(feature_layer, config.num_hidden_layers)
        self.feature_layer = feature_layer
        self.drop_cls = drop_cls and has_cls

    def encode(self, pixel_values: Tensor) -> Tensor:
        """Hidden state `feature_layer` of the tower for `pixel_values` (cast to the model's dtype)."""
        outputs = self.model(pixel_values=pixel_values.to(self.model.dtype), output_hidden_states=[self.layer_index])
        features = outputs.hidden_states[self.layer_index]
        return features[:, 1:] if self.drop_cls else features

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, feature_layer={self.feature_layer}, drop_cls={self.drop_cls}"


def _load_hf_vision_model(kind: str, path: str | None, config: dict | None) -> nn.Module:
    """A ``{kind}VisionModel`` (CLIP or Siglip) from a local directory or from a config dict (random weights)."""
    require("hf", f"the {kind} vision encoder")
    import transformers

    model_class = getattr(transformers, f"{kind}VisionModel")
    config_class = getattr(transformers, f"{kind}VisionConfig")
    expect((path is None) != (config is None), "path/config",
           f"exactly one of them: path= a local directory saved by {model_class.__name__}.save_pretrained, "
           f"or config= a dict of {config_class.__name__} fields", f"path={path!r}, config={config!r}")
    if path is not None:
        expect(isinstance(path, (str, os.PathLike)), "path", "a local directory (str)", repr(path))
        expect(os.path.isdir(path), "path", "an existing local directory holding config.json and the weights",
               lambda: missing_path(path, "is not a directory" if os.path.exists(path) else "does not exist"))
        try:
            return model_class.from_pretrained(os.fspath(path), **local_load_options())
        except (OSError, ValueError, KeyError) as error:
            raise CMoEError(f"path: cannot load a {model_class.__name__} from the local directory "
                            f"{os.fspath(path)!r}: {error}") from error
    expect(isinstance(config, dict), "config", f"a dict of {config_class.__name__} fields",
           type(config).__name__)
    try:
        return model_class(config_class(**config))
    except Exception as error:
        raise CMoEError(f"config: not a valid {config_class.__name__}: {error}") from error


def build_hf_clip(path: str | None = None, config: dict | None = None, feature_layer: int = -2,
                  drop_cls: bool = True, freeze: bool = True) -> HFVisionEncoder:
    """A CLIP vision tower (``transformers.CLIPVisionModel``) as a `VisionEncoder`.

    Give exactly one of `path` (a LOCAL directory, e.g. a downloaded ``openai/clip-vit-large-patch14-336``;
    nothing is fetched; weights keep the dtype transformers loads them in) or `config` (a dict of
    ``CLIPVisionConfig`` fields, random weights). Inputs are cast to the model's dtype. The output is
    ``hidden_states[feature_layer]`` — LLaVA's default -2 is the penultimate layer, before ``post_layernorm`` —
    with the CLS token dropped when `drop_cls`, so ``num_patches = (image_size // patch_size) ** 2``.
    """
    encoder = HFVisionEncoder(_load_hf_vision_model("CLIP", path, config), feature_layer, drop_cls, has_cls=True)
    return encoder.freeze() if freeze else encoder


def build_hf_siglip(path: str | None = None, config: dict | None = None, feature_layer: int = -2,
                    drop_cls: bool = False, freeze: bool = True) -> HFVisionEncoder:
    """A SigLIP vision tower (``transformers.SiglipVisionModel``) as a `VisionEncoder`.

    Same as `build_hf_clip`, but SigLIP has no CLS token: every token is a patch and `drop_cls` must stay
    False. With `config`, the attention-pooling head (never used here) is not built unless the config sets
    ``vision_use_head``.
    """
    expect(drop_cls is False, "drop_cls", "False: SigLIP has no CLS token, every output token is a patch",
           repr(drop_cls))
    if isinstance(config, dict):
        config = {"vision_use_head": False, **config}
    encoder = HFVisionEncoder(_load_hf_vision_model("Siglip", path, config), feature_layer, False, has_cls=False)
    return encoder.freeze() if freeze else encoder
