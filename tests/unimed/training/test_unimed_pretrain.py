"""The pretrained tiny components (`cmoe unimed pretrain`): the shipped weights load through the tiny config,
their encoder's linear probes match the committed table, the command rebuilds weights whose probes beat a
random-init encoder, and the demo's visual tasks learn with the pretrained encoder where a random one does not."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cmoe.errors import CMoEError
from cmoe.plugins.vision_encoders import build_hf_clip
from cmoe.reference_models.unimed.config import PRETRAINED_DIR, load_config
from cmoe.reference_models.unimed.data.synthetic import SyntheticConfig, generate
from cmoe.reference_models.unimed.model.assembly import build_model
from cmoe.reference_models.unimed.training.pretrain import (
    ENCODER_CONFIG,
    PretrainConfig,
    build_encoder,
    make_scene_set,
    probe_accuracies,
    probe_sets,
    pretrain_config,
)
from cmoe.reference_models.unimed.training.train import make_tokenizer, prompt_texts

CLEARLY_LEARNT = ("modality (texture)", "body region", "organ count", "lesion presence", "lesion brightness",
                  "patch content")
"""Probed attributes the pretrained encoder carries far better than a random one (the lesion quadrant does not:
see docs/unimed.md)."""


def test_tiny_config_loads_the_shipped_weights_frozen_with_lora_and_a_covering_tokenizer() -> None:
    config = load_config("tiny")
    assert config.model.vision_encoder.options["path"] == str(PRETRAINED_DIR / "vision_encoder")
    samples = generate(SyntheticConfig(num_images=40, qa_questions=24, vqa_per_image=8))
    tokenizer = make_tokenizer(config, samples)
    unknown = [text for text in prompt_texts(samples) if tokenizer.unk_token_id in tokenizer(text).input_ids]
    assert not unknown
    model = build_model(config.model, tokenizer)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("connector" in name or "lora_" in name for name in trainable)
    shipped = build_hf_clip(path=str(PRETRAINED_DIR / "vision_encoder"), feature_layer=-1)
    torch.testing.assert_close(model.vision_encoder.state_dict(), shipped.state_dict())
    assert sum(f.stat().st_size for f in PRETRAINED_DIR.rglob("*.safetensors")) < 5_000_000


@pytest.mark.slow
def test_shipped_encoder_gives_the_committed_probe_accuracies() -> None:
    """The committed probe table, recomputed from the shipped weights (same probe images and steps); the
    committed table shows the pretrained encoder ahead of the random-init one on what the tasks need."""
    committed = json.loads((PRETRAINED_DIR / "pretrain.json").read_text())
    config = PretrainConfig(**committed["config"])
    encoder = build_hf_clip(path=str(PRETRAINED_DIR / "vision_encoder"), feature_layer=-1).model
    measured = probe_accuracies(encoder, *probe_sets(config), config.probe_steps)
    for name, row in committed["probes"].items():
        assert measured[name] == pytest.approx(row["pretrained"], abs=0.02), name
    for name in CLEARLY_LEARNT:
        row = committed["probes"][name]
        assert row["pretrained"] > max(row["random_init"], row["majority"]) + 0.1, name


def test_scene_labels_match_the_rendered_ground_truth() -> None:
    data = make_scene_set(8, seed=5)
    torch.testing.assert_close(data.patch.sum(-1), torch.ones(8, 64))
    lesion = data.patch[..., -1].sum(1) > 0
    assert torch.equal(lesion, data.labels["lesion_quadrant"] > 0)
    assert torch.equal(data.organs.sum(1).long() - 1, data.labels["count"])


@pytest.mark.slow
def test_pretrain_command_from_a_small_budget_beats_random_init(tmp_path: Path) -> None:
    budget = {"encoder_images": 600, "encoder_steps": 150, "llm_images": 200, "llm_steps": 60,
              "probe_train_images": 400, "probe_test_images": 200, "probe_steps": 200}
    sets = [arg for key, value in budget.items() for arg in ("--set", f"{key}={value}")]
    run = subprocess.run([sys.executable, "-m", "cmoe", "unimed", "pretrain", "--out", str(tmp_path), *sets],
                         capture_output=True, text=True, timeout=3600)
    assert run.returncode == 0, run.stderr[-2000:]
    record = json.loads((tmp_path / "pretrain.json").read_text())
    # At this budget (about 30 s of CPU) organ identity per patch and the organ count are ahead already (+10
    # points each when written); the modality follows later (99.6 % in the shipped run).
    for name in ("patch content", "organ count"):
        row = record["probes"][name]
        assert row["pretrained"] > row["random_init"] + 0.05, (name, row)
    assert record["llm_loss"]["last_tenth_mean"] < 0.6 * record["llm_loss"]["first"]
    encoder = build_hf_clip(path=str(tmp_path / "vision_encoder"), feature_layer=-1)
    assert encoder.out_features == ENCODER_CONFIG["hidden_size"] and encoder.num_patches == 64
    key = "embeddings.patch_embedding.weight"
    assert not torch.equal(encoder.model.state_dict()[key], build_encoder(0).state_dict()[key])  # it trained


def _cls_accuracy(tmp_path: Path, name: str, **model: object) -> float:
    """Classification accuracy after a small budget of cls entries with the tiny config."""
    from cmoe.reference_models.unimed.evaluation.evaluate import run_evaluation
    from cmoe.reference_models.unimed.training.train import Trainer

    overrides = {"output_dir": str(tmp_path / name),
                 "data": {"synthetic": {"num_images": 160, "eval_images": 30, "tasks": ["cls"]},
                          "ratios": {"_replace": True, "synthetic_cls": 1}},
                 "train": {"steps": 60, "warmup_steps": 5, "log_every": 20, "save_every": 60, "progress": False},
                 "eval": {"limit_per_task": 30, "max_new_tokens": 8}, "model": model}
    config = load_config("tiny", overrides)
    Trainer(config).train()
    return run_evaluation(config)["cls"]["accuracy"].value


@pytest.mark.slow
def test_pretrained_encoder_learns_the_visual_task_where_a_random_one_does_not(tmp_path: Path) -> None:
    """Same budget, same pretrained LLM + LoRA and connector; only the frozen encoder differs."""
    random_encoder = {"vision_encoder": {"options": load_config("tiny_random").model.vision_encoder.options
                                         | {"_replace": True}}}
    pretrained = _cls_accuracy(tmp_path, "pretrained")
    random_init = _cls_accuracy(tmp_path, "random", **random_encoder)
    assert pretrained >= 0.8 and pretrained > random_init + 0.3, (pretrained, random_init)


def test_pretrain_overrides_are_checked() -> None:
    assert pretrain_config(["encoder_steps=10", "encoder_lr=1e-3"]).encoder_steps == 10
    with pytest.raises(CMoEError, match="--set: expected key=value with a key among"):
        pretrain_config(["encoder_stepz=10"])
    with pytest.raises(CMoEError, match="--set encoder_steps: expected a number, got 'many'"):
        pretrain_config(["encoder_steps=many"])
