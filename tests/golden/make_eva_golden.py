"""Golden files from the ORIGINAL Uni-Med EVA ViT (``uni_med/models/eva_vit.py``), run unchanged at a tiny size.

Re-run (the venv is the one of make_original_run.py; the run takes a few seconds on one CPU core)::

    bash tests/golden/original_venv.sh /tmp/unimed-orig-venv
    /tmp/unimed-orig-venv/bin/python tests/golden/make_eva_golden.py tests/data/unimed_original_eva

The original tree (tsinghua-msiip/Uni-Med @ 63b9dfb0db31e61afcb381865225d69518377f3d) is extracted from the git
mirror (``git archive``) into a temporary folder; ``--checkout DIR`` uses a work tree instead (checked file by file
against the commit's blob hashes when the mirror exists, as make_original_run.py does). Re-running reproduces both
files byte for byte (checked: two runs, same sha256; single thread, deterministic algorithms, seeded). Another
torch build could change the last bits of the float32 results; the versions are in golden.json["versions"].

What runs: the original's own ``BaseModel.init_vision_encoder("eva_clip_g", img_size, 0, False, precision, True)``
(uni_med/models/base_model.py, with Uni-Med's config values drop_path_rate 0, use_grad_checkpoint False,
freeze_vit True), which calls ``create_eva_vit_g`` (VisionTransformer, download, ``torch.load``,
``interpolate_pos_embed``, ``load_state_dict(strict=False)``, ``convert_weights_to_fp16`` for "fp16") and builds
``ln_vision = LayerNorm(num_features)`` (base_model's fp32 LayerNorm), then ``forward`` on random images, and
``ln_vision(visual_encoder(image))[:, 1:, :]`` (the expression of ``UniMed.encode_img``, uni_med/models/uni_med.py
lines 170-171). Three builds: 42 px (3x3 grid, the checkpoint's own grid) in fp32, 56 px (4x4 grid: the
original's ``interpolate_pos_embed`` resizes the 3x3 ``pos_embed``) in fp32, and 42 px in fp16 (Uni-Med's
``vit_precision: fp16``: only the parameter dtypes are recorded; the fp16 model needs CUDA autocast to run).

Harness patches (the original's files are not edited; each is listed in golden.json["produced_by"]):

1. torchvision 0.28.0 (a CUDA build) cannot be imported on CPU torch unless the schemas ``torchvision::nms`` and
   ``torchvision::qnms`` are declared first (make_original_run.py's ``declare_torchvision_ops``); ``timm`` imports
   torchvision. No torchvision operator runs.
2. Tiny size: ``uni_med.models.eva_vit.VisionTransformer`` (the name ``create_eva_vit_g`` calls) is rebound to a
   function that calls the original class with create_eva_vit_g's arguments, except ``embed_dim`` 1408 -> 16,
   ``depth`` 39 -> 2 and ``num_heads`` 16 -> 2 (the arguments it received are recorded and checked).
3. No download: ``uni_med.models.eva_vit.download_cached_file`` returns the path of the tiny checkpoint the harness
   wrote (a ``torch.save`` of a bare state dict in LAVIS ``eva_vit_g.pth``'s key layout, with one block more than
   the model, as the real 40-block file has for BLIP-2's 39 blocks).
4. Weights: the checkpoint is the state dict of the original ``VisionTransformer`` (same arguments, depth 3) whose
   every parameter is overwritten with seeded random values (the original inits biases, q_bias and v_bias to zero
   and LayerNorms to (1, 0), which would hide them); the scales keep the residual stream small (std ~0.05) so
   LayerNorm eps matters at float32 precision.
5. One extra record uses an ``ln_vision`` with seeded random weight and bias (Uni-Med's own is weight 1, bias 0:
   it is built fresh and never loaded) to check that its affine parameters are applied.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import importlib.metadata
import io
import json
import platform
import shutil
import subprocess
import sys
import tempfile
from contextlib import redirect_stdout
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from make_original_run import COMMIT, MIRROR, check_checkout, declare_torchvision_ops  # noqa: E402

LAVIS_URL = "https://storage.googleapis.com/sfr-vision-language-research/LAVIS/models/BLIP2/eva_vit_g.pth"
IMG_SIZE = 42
LARGE_IMG_SIZE = 56
PATCH_SIZE = 14
EMBED_DIM = 16
DEPTH = 2
CHECKPOINT_DEPTH = 3
NUM_HEADS = 2
MLP_RATIO = 4.3637  # create_eva_vit_g's; int(16 * 4.3637) = 69
BATCH = 2
WEIGHT_SEED = 20240917
IMAGE_SEED = 1409
LN_SEED = 88
# create_eva_vit_g's arguments to VisionTransformer (at drop_path_rate 0, use_checkpoint False) and the tiny values
# harness patch 2 puts in their place.
ORIGINAL_G = {"patch_size": 14, "use_mean_pooling": False, "embed_dim": 1408, "depth": 39, "num_heads": 16,
              "mlp_ratio": 4.3637, "qkv_bias": True, "drop_path_rate": 0, "use_checkpoint": False}
TINY = {"embed_dim": EMBED_DIM, "depth": DEPTH, "num_heads": NUM_HEADS}
PACKAGES = ("torch", "timm", "torchvision", "numpy", "safetensors")


def versions() -> dict:
    result = {"python": platform.python_version()}
    for name in PACKAGES:
        result[name] = importlib.metadata.version(name)
    return result


def extract(tmp: Path) -> Path:
    tree = tmp / "Uni-Med"
    tree.mkdir()
    archive = subprocess.run(["git", "--git-dir", MIRROR, "archive", COMMIT], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return tree


def randomise(model, torch) -> None:
    """Harness patch 4: every parameter of `model` <- seeded random values (name order), sensible scales."""
    generator = torch.Generator().manual_seed(WEIGHT_SEED)

    def normal(shape, std):
        return torch.randn(shape, generator=generator, dtype=torch.float32) * std

    with torch.no_grad():
        for name, param in model.named_parameters():
            shape, leaf = param.shape, name.rsplit(".", 1)[-1]
            if name in ("cls_token", "pos_embed"):
                value = normal(shape, 0.05)
            elif name.startswith("patch_embed.proj."):
                value = normal(shape, 0.05 / (3 * PATCH_SIZE * PATCH_SIZE) ** 0.5) if leaf == "weight" \
                    else normal(shape, 0.02)
            elif ".norm" in name:
                value = 1 + normal(shape, 0.2) if leaf == "weight" else normal(shape, 0.2)
            elif leaf in ("q_bias", "v_bias"):
                value = normal(shape, 0.5)
            elif name.endswith("attn.qkv.weight") or name.endswith("mlp.fc1.weight"):
                value = normal(shape, shape[1] ** -0.5)
            elif name.endswith("mlp.fc1.bias"):
                value = normal(shape, 0.5)
            elif name.endswith("attn.proj.weight") or name.endswith("mlp.fc2.weight"):
                value = normal(shape, 0.05 * shape[1] ** -0.5)
            elif name.endswith("attn.proj.bias") or name.endswith("mlp.fc2.bias"):
                value = normal(shape, 0.02)
            else:
                raise SystemExit(f"no rule for parameter {name}")
            param.copy_(value)


def main(out_dir: Path, checkout: Path | None) -> None:
    out_dir = out_dir.resolve()
    tmp = Path(tempfile.mkdtemp(prefix="unimed-eva-golden-"))
    try:
        if checkout is None:
            checkout = extract(tmp)
            checkout_check = f"extracted by `git archive {COMMIT}` from the mirror"
        else:
            checkout = checkout.resolve()
            checkout_check = check_checkout(checkout)
        declare_torchvision_ops()  # harness patch 1
        import torch
        from safetensors.torch import save_file

        torch.set_num_threads(1)
        torch.use_deterministic_algorithms(True)
        sys.path.insert(0, str(checkout))
        import uni_med.models.base_model as base_model
        import uni_med.models.eva_vit as eva_vit

        for module in (base_model, eva_vit):
            assert Path(module.__file__).resolve().is_relative_to(checkout), module.__file__
        OriginalViT = eva_vit.VisionTransformer
        calls = []

        def tiny_vision_transformer(**kwargs):  # harness patch 2
            calls.append(dict(kwargs))
            norm = kwargs["norm_layer"]
            assert norm.func is torch.nn.LayerNorm and norm.keywords == {"eps": 1e-6} and not norm.args, norm
            assert {k: kwargs[k] for k in ORIGINAL_G} == ORIGINAL_G, kwargs
            return OriginalViT(**{**kwargs, **TINY})

        checkpoint_path = tmp / "eva_vit_g.pth"

        def local_file(url, check_hash=True, progress=False):  # harness patch 3
            assert url == LAVIS_URL, url
            return str(checkpoint_path)

        eva_vit.VisionTransformer = tiny_vision_transformer
        eva_vit.download_cached_file = local_file

        # The checkpoint: the original class, create_eva_vit_g's arguments, one block more, random weights.
        source = OriginalViT(img_size=IMG_SIZE, **{**ORIGINAL_G, **TINY, "depth": CHECKPOINT_DEPTH},
                             norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6))
        randomise(source, torch)
        state_dict = {k: v.detach().clone().contiguous() for k, v in source.state_dict().items()}
        torch.save(state_dict, checkpoint_path)

        def init(img_size, precision):
            log = io.StringIO()
            with redirect_stdout(log):
                vit, ln = base_model.BaseModel.init_vision_encoder("eva_clip_g", img_size, 0, False, precision, True)
            return vit, ln, log.getvalue()

        vit, ln_vision, log_small = init(IMG_SIZE, "fp32")
        vit_large, ln_large, log_large = init(LARGE_IMG_SIZE, "fp32")
        vit_half, _, log_half = init(IMG_SIZE, "fp16")
        assert log_small == "" and log_half == "", (log_small, log_half)
        assert len(calls) == 3 and [c["img_size"] for c in calls] == [IMG_SIZE, LARGE_IMG_SIZE, IMG_SIZE]

        generator = torch.Generator().manual_seed(IMAGE_SEED)
        # drawn in float32, rounded to float16 (so the file can hold them as float16 exactly)
        images = torch.randn(BATCH, 3, IMG_SIZE, IMG_SIZE, generator=generator).half().float()
        images_large = torch.randn(BATCH, 3, LARGE_IMG_SIZE, LARGE_IMG_SIZE, generator=generator).half().float()
        ln_random = base_model.LayerNorm(vit.num_features)
        ln_generator = torch.Generator().manual_seed(LN_SEED)
        with torch.no_grad():
            ln_random.weight.copy_(1 + 0.3 * torch.randn(EMBED_DIM, generator=ln_generator))
            ln_random.bias.copy_(0.3 * torch.randn(EMBED_DIM, generator=ln_generator))

        with torch.no_grad():
            tokens = vit(images)
            tokens_large = vit_large(images_large)
            normed = ln_vision(tokens)
            normed_random = ln_random(tokens)
            features = ln_vision(vit(images))[:, 1:, :]  # UniMed.encode_img, uni_med.py:170-171
            features_large = ln_large(vit_large(images_large))[:, 1:, :]

        # Self-checks of the harness: what was loaded is the checkpoint (the extra block ignored), and the
        # interpolated pos_embed is what the original's interpolate_pos_embed makes of the checkpoint.
        loaded = vit.state_dict()
        unexpected = sorted(set(state_dict) - set(loaded))
        assert not set(loaded) - set(state_dict)
        assert unexpected == sorted(k for k in state_dict if k.startswith(f"blocks.{DEPTH}.")), unexpected
        assert all(torch.equal(loaded[k], state_dict[k]) for k in loaded)
        direct = dict(state_dict)
        with redirect_stdout(io.StringIO()):
            eva_vit.interpolate_pos_embed(vit_large, direct)
        assert torch.equal(direct["pos_embed"], vit_large.pos_embed.detach())
        assert all(torch.equal(v, state_dict[k]) for k, v in vit_large.state_dict().items() if k != "pos_embed")
        assert torch.equal(ln_vision.weight, torch.ones(EMBED_DIM)) and torch.equal(ln_vision.bias,
                                                                                    torch.zeros(EMBED_DIM))
        assert ln_vision.eps == 1e-5 and all(b.norm1.eps == 1e-6 and b.norm2.eps == 1e-6 for b in vit.blocks)
        assert all(not p.requires_grad for p in vit.parameters()) and not vit.training
        half = {name: str(p.dtype).replace("torch.", "") for name, p in vit_half.named_parameters()}
        assert set(half.values()) == {"float16", "float32"}
        assert all(torch.equal(p.float(), loaded[n].half().float()) if half[n] == "float16" else
                   torch.equal(p, loaded[n]) for n, p in vit_half.named_parameters())

        tensors = {f"checkpoint/{k}": v for k, v in state_dict.items()}
        tensors.update({
            "images/small": images.half(), "images/large": images_large.half(),
            "tokens/small": tokens, "tokens/large": tokens_large,
            "ln_vision/small": normed, "ln_vision_random/small": normed_random,
            "ln_vision_random/weight": ln_random.weight.detach().clone(),
            "ln_vision_random/bias": ln_random.bias.detach().clone(),
            "features/small": features, "features/large": features_large,
            "pos_embed/large": vit_large.pos_embed.detach().clone(),
        })
        golden = {
            "schema": SCHEMA,
            "commit": COMMIT,
            "config": {"img_size": IMG_SIZE, "large_img_size": LARGE_IMG_SIZE, "patch_size": PATCH_SIZE,
                       "embed_dim": EMBED_DIM, "depth": DEPTH, "checkpoint_depth": CHECKPOINT_DEPTH,
                       "num_heads": NUM_HEADS, "mlp_ratio": MLP_RATIO,
                       "mlp_hidden": vit.blocks[0].mlp.fc1.out_features,
                       "qkv_bias": True, "norm_eps": 1e-6, "ln_vision_eps": ln_vision.eps, "batch": BATCH},
            "vision_transformer_calls": [{k: (repr(v) if k == "norm_layer" else v) for k, v in c.items()}
                                         for c in calls],
            "interpolation_log": log_large.strip(),
            "load": {"checkpoint_keys": len(state_dict), "ignored_by_strict_false": unexpected},
            "fp16": {"converted": sorted(n for n, d in half.items() if d == "float16"),
                     "kept_float32": sorted(n for n, d in half.items() if d == "float32")},
            "seeds": {"weights": WEIGHT_SEED, "images": IMAGE_SEED, "ln_vision_random": LN_SEED},
            "produced_by": produced_by(checkout_check),
            "versions": versions(),
        }
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "golden.json").write_text(json.dumps(golden, indent=1, ensure_ascii=False) + "\n",
                                             encoding="utf-8")
        save_file({k: v.contiguous() for k, v in sorted(tensors.items())}, str(out_dir / "golden.safetensors"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for path in sorted(out_dir.iterdir()):
        print(path.name, path.stat().st_size, hashlib.sha256(path.read_bytes()).hexdigest())


SCHEMA = {
    "golden.safetensors": {
        "checkpoint/<key>": "the tiny eva_vit_g.pth, bare LAVIS keys (cls_token, pos_embed, patch_embed.proj.*, "
                            "blocks.<i>.{norm1,attn.qkv.weight,attn.q_bias,attn.v_bias,attn.proj,norm2,mlp.fc1,"
                            "mlp.fc2}.*), checkpoint_depth blocks, pos_embed for the img_size grid; float32",
        "images/small|large": "input images [batch, 3, img_size|large_img_size, ...], stored float16 (exact: "
                              "drawn float32 and rounded to float16 before use); cast to float32 to use",
        "tokens/small|large": "visual_encoder(images): VisionTransformer.forward, all tokens, CLS first, no norm",
        "ln_vision/small": "ln_vision(tokens/small), Uni-Med's ln_vision (base_model.LayerNorm, weight 1, bias 0)",
        "ln_vision_random/small": "the same with base_model.LayerNorm of weight/bias ln_vision_random/weight|bias",
        "features/small|large": "ln_vision(visual_encoder(image))[:, 1:, :] (UniMed.encode_img's features)",
        "pos_embed/large": "the large model's pos_embed after create_eva_vit_g's interpolate_pos_embed + load",
    },
    "vision_transformer_calls": "the arguments create_eva_vit_g passed to VisionTransformer (before patch 2)",
    "load": "checkpoint keys ignored by create_eva_vit_g's load_state_dict(strict=False) (the extra block)",
    "fp16": "parameter names by dtype after init_vision_encoder(..., precision='fp16') (convert_weights_to_fp16)",
}


def produced_by(checkout_check: str) -> dict:
    return {
        "summary": f"The original Uni-Med EVA ViT (tsinghua-msiip/Uni-Med {COMMIT}, uni_med/models/eva_vit.py and "
                   "base_model.py) run unchanged by tests/golden/make_eva_golden.py in the venv of "
                   "tests/golden/original_venv.sh; CPU, float32 (plus one fp16 build for dtypes), eval mode, "
                   "single thread, torch.use_deterministic_algorithms(True).",
        "checkout": checkout_check,
        "scripts": ["tests/golden/original_venv.sh", "tests/golden/make_eva_golden.py",
                    "tests/golden/make_original_run.py (declare_torchvision_ops, check_checkout)"],
        "original_code_run": ["uni_med.models.base_model.BaseModel.init_vision_encoder('eva_clip_g', img_size, "
                              "0, False, 'fp32'|'fp16', True)",
                              "uni_med.models.eva_vit.create_eva_vit_g (VisionTransformer, torch.load, "
                              "interpolate_pos_embed, load_state_dict(strict=False), convert_weights_to_fp16)",
                              "VisionTransformer.forward, base_model.LayerNorm.forward",
                              "uni_med.models.eva_vit.interpolate_pos_embed (again, directly: harness self-check)"],
        "harness_patches": [
            "torchvision 0.28.0 (CUDA build, C ops unloadable on CPU torch; timm imports it): the schemas "
            "torchvision::nms and torchvision::qnms declared with torch.library before import (no operator is "
            "called)",
            "uni_med.models.eva_vit.VisionTransformer (as called by create_eva_vit_g) -> the original class with "
            f"embed_dim 1408->{EMBED_DIM}, depth 39->{DEPTH}, num_heads 16->{NUM_HEADS}; every other argument as "
            "create_eva_vit_g passes it (checked)",
            "uni_med.models.eva_vit.download_cached_file -> the path of the harness's tiny checkpoint "
            "(torch.save of a bare state dict, LAVIS eva_vit_g.pth layout)",
            f"checkpoint = state dict of the original VisionTransformer with depth {CHECKPOINT_DEPTH} (one block "
            f"more than the model, as the 40-block eva_vit_g.pth for 39) and every parameter overwritten with "
            f"seeded random values (seed {WEIGHT_SEED}; std 0.05 for cls_token/pos_embed, 0.05/sqrt(fan_in) "
            "for patch_embed/attn.proj/mlp.fc2 weights, 1/sqrt(fan_in) for qkv/fc1 weights, 0.5 for "
            "q_bias/v_bias/fc1 bias, 0.02 for other biases, LayerNorms 1+0.2N / 0.2N)",
            f"an extra ln_vision (base_model.LayerNorm) with weight 1+0.3N, bias 0.3N (seed {LN_SEED}) for the "
            "ln_vision_random record; Uni-Med's own ln_vision is the fresh one (weight 1, bias 0)",
            "encode_img's feature expression ln_vision(visual_encoder(image))[:, 1:, :] (uni_med.py:170-171) "
            "evaluated by the harness (maybe_autocast is a no-op on CPU)",
        ],
        "venv": "python3.11 venv of tests/golden/original_venv.sh (torch 2.13.0 CPU, timm 0.6.13, ...); exact "
                "versions in 'versions'",
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--checkout", type=Path, default=None,
                        help="a work tree of the original at the commit (default: extract it from the mirror)")
    args = parser.parse_args()
    main(args.out_dir, args.checkout)
