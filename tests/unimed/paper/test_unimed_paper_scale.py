"""The ``paper`` model at full size on the meta device (no memory): its parts counted against the paper's
figures; the memory estimate; materialisation on a device; and the prepared GPU step script's CPU dry run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cmoe.reference_models.unimed.model.memory import build_on_meta, estimate_memory
from cmoe.reference_models.unimed.paper import paper_step
from cmoe.reference_models.unimed.paper.scale import materialize, parameter_counts, random_weight_config
from cmoe.reference_models.unimed.model.tokenizer import build_word_tokenizer


@pytest.mark.slow
def test_paper_model_on_the_meta_device_has_the_papers_parameter_counts() -> None:
    config = random_weight_config()
    assert config.model.connector.preset == "original" and config.model.dtype == "float16"
    model = build_on_meta(config, build_word_tokenizer(["a b"]))
    assert {p.device.type for p in model.parameters()} == {"meta"}
    counts = parameter_counts(model)
    assert counts["router"] == 507_781_125  # MLP 11264 → 45056 → 5
    assert counts["experts"] == 199_270_400  # 5 × (5632 → 4096 → 4096)
    assert counts["task_tokens"] == 5 * 5632
    assert counts["llm"] == 6_738_415_616  # LLaMA-2-7B
    assert counts["lora"] == 32 * 8 * (4 * 2 * 4096 + 3 * (4096 + 11008))  # r 8 on q, k, v, o, gate, up, down
    assert 0.95e9 < counts["vision_encoder"] < 1.05e9  # EVA-CLIP ViT-g, 39 of its 40 blocks: "≈ 1.0 B"
    estimate = estimate_memory(model, batch_size=4, text_tokens=256)
    trainable = counts["router"] + counts["experts"] + counts["task_tokens"] + counts["lora"]
    assert estimate.trainable_weights == estimate.gradients == 4 * trainable  # float32 connector and LoRA
    assert estimate.optimizer == 8 * trainable
    # EVA fp32 as built; the LLM loaded in fp16 and cast to fp32 as the original's prepare_model_for_kbit_training
    assert config.model.llm_upcast == "float32"
    assert estimate.frozen_weights == 4 * counts["vision_encoder"] + 4 * counts["llm"]
    assert 0 < estimate.activations < estimate.frozen_weights


def test_materialize_fills_a_meta_model_on_the_device() -> None:
    config = random_weight_config(paper_step.DRY_RUN)
    model = build_on_meta(config, build_word_tokenizer(["a b"]))
    materialize(model, "cpu", frozen_dtype=torch.bfloat16)
    assert {t.device.type for t in [*model.parameters(), *model.buffers()]} == {"cpu"}
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    trainable = {p.dtype for p in model.parameters() if p.requires_grad}
    assert frozen == {torch.bfloat16} and trainable == {torch.float32}
    rotary = next(m for m in model.modules() if hasattr(m, "inv_freq"))
    torch.testing.assert_close(rotary.inv_freq, type(rotary)(rotary.config).inv_freq)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_paper_step_script_dry_run(tmp_path: Path, capsys) -> None:
    out = tmp_path / "step.json"
    code = paper_step.main(["--dry-run", "--steps", "2", "--warmup", "0", "--batch-size", "2", "--text-tokens", "8",
                            "--answer-tokens", "4", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert printed.index("memory estimate per device") < printed.index("2 steps of batch 2 (fp32)")
    result = json.loads(out.read_text())
    assert result["steps_timed"] == 2 and len(result["step_s"]) == 2 and all(t > 0 for t in result["step_s"])
    assert len(result["losses"]) == 2 and all(0 < loss < 20 for loss in result["losses"])
    assert result["parameters"]["router"] > 0 and result["estimate_gib"]["total"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without a GPU")
def test_paper_step_script_needs_a_gpu_without_dry_run(capsys) -> None:
    assert paper_step.main(["--steps", "1"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
