"""`model.memory.build_on_meta` with pretrained components (what FSDP's ranks > 0 build): the HF builders and
EVA-CLIP honour the meta device context, so the model matches the real build in everything but storage."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from cmoe.plugins.eva_clip import EVAViTConfig, build_eva_clip_g
from cmoe.reference_models.unimed.model.assembly import build_model
from cmoe.reference_models.unimed.model.memory import build_on_meta
from cmoe.reference_models.unimed.data.splits import load_split
from cmoe.reference_models.unimed.training.train import make_tokenizer

from unimed_tiny import test_config as tiny_config

pytestmark = pytest.mark.smoke  # in the newest-versions stage (.ci/latest)


def _layout(model: torch.nn.Module) -> dict:
    return {"parameters": [(n, tuple(p.shape), p.dtype, p.requires_grad) for n, p in model.named_parameters()],
            "buffers": [(n, tuple(b.shape), b.dtype) for n, b in model.named_buffers()],
            "training": [(n, m.training) for n, m in model.named_modules()]}


def test_meta_build_of_the_pretrained_tiny_model_matches_the_real_one(tmp_path: Path) -> None:
    config = tiny_config(tmp_path)
    tokenizer = make_tokenizer(config, load_split(config.data, config.data.train_split))
    real = build_model(config.model, tokenizer)
    meta = build_on_meta(config, tokenizer)
    assert all(t.is_meta for t in [*meta.parameters(), *meta.buffers()])
    assert not any(t.is_meta for t in [*real.parameters(), *real.buffers()])
    assert _layout(meta) == _layout(real)
    hf_meta, hf_real = meta.llm.model.get_base_model(), real.llm.model.get_base_model()
    assert hf_meta.generation_config.to_dict() == hf_real.generation_config.to_dict()
    assert hf_meta.config.to_dict() == hf_real.config.to_dict()


def test_eva_clip_in_a_meta_context_does_not_read_its_checkpoint(tmp_path: Path) -> None:
    tiny = dataclasses.asdict(EVAViTConfig.tiny())
    with torch.device("meta"):
        encoder = build_eva_clip_g(path=str(tmp_path / "not_there.pth"), config=tiny)
    assert all(p.is_meta for p in encoder.parameters())
    assert _layout(encoder) == _layout(build_eva_clip_g(config=tiny))
