"""The Uni-Med recipe end to end on the tiny config: config checks, schedule, model, training (loss falls on
every task), atomic checkpoints, bit-exact resume, evaluation tables and the command line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from cmoe.errors import CMoEError, UnknownNameError
from cmoe.reference_models.unimed.model.checkpoint import find_latest, read_checkpoint
from cmoe.reference_models.unimed.model.collate import Collator, task_id
from cmoe.reference_models.unimed.config import TrainSection, config_from_dict, load_config, parse_overrides
from cmoe.reference_models.unimed.evaluation.evaluate import run_evaluation
from cmoe.reference_models.unimed.model.assembly import CONNECTOR_PRESETS, build_model, connector_config
from cmoe.reference_models.unimed.data.splits import load_split
from cmoe.reference_models.unimed.training.train import Trainer, learning_rate, make_tokenizer, parameter_groups

from unimed_tiny import test_config as tiny_config

TASKS = {"qa", "vqa", "report", "rec", "reg", "cls"}

@pytest.mark.smoke

def test_built_in_configs_load_and_paper_config_has_the_original_settings() -> None:
    paper = load_config("paper")
    assert (paper.train.batch_size, paper.train.steps, paper.train.lr) == (4, 50_000, 1e-5)
    assert (paper.train.warmup_steps, paper.train.warmup_start_lr, paper.train.min_lr) == (5_000, 1e-6, 1e-7)
    assert paper.train.weight_decay == 0.05 and paper.seed == 42
    assert paper.model.vision_encoder.name == "eva_clip_g" and paper.model.connector.preset == "original"
    assert (paper.model.lora.r, paper.model.lora.alpha, paper.model.lora.dropout) == (8, 16, 0.05)
    assert paper.model.aggregation.kind == "reshape" and paper.model.aggregation.rate == 4
    assert {d.name for d in paper.data.datasets} >= {"slake_vqa", "mimic_cxr", "medqa", "dermamnist"}
    assert load_config("tiny").model.tokenizer.kind == "pretrained"  # the shipped pretrained tiny LLM's
    assert load_config("tiny_random").model.tokenizer.kind == "word_level"


def test_config_inheritance_merges_mappings_and_replace_swaps_one_whole(tmp_path: Path) -> None:
    """``base:`` merges key by key; a mapping marked ``_replace: true`` replaces the inherited one instead."""
    merged = tmp_path / "merged.yaml"
    merged.write_text("base: tiny\nmodel: {connector: {options: {router_hidden: 32}}}\n")
    assert load_config(merged).model.connector.options == {"expert_hidden": 64, "router_hidden": 32}
    replaced = tmp_path / "replaced.yaml"
    replaced.write_text("base: tiny\n"
                        "model: {connector: {preset: mlp, options: {_replace: true, hidden_features: 48}}}\n")
    config = load_config(replaced)
    assert config.model.connector.preset == "mlp" and config.model.connector.options == {"hidden_features": 48}
    assert load_config(replaced, {"train": {"steps": 7}}).train.steps == 7  # overrides still merge on top


def test_bad_config_values_give_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(CMoEError, match=r"train: unknown key\(s\) \['stepz'\]; known keys: .*steps"):
        load_config("tiny", {"train": {"stepz": 3}})
    with pytest.raises(CMoEError, match="train.precision: expected fp32, bf16 or fp16"):
        load_config("tiny", {"train": {"precision": "fp8"}})
    with pytest.raises(CMoEError, match="train.batch_size: expected an int >= 1"):
        load_config("tiny", {"train": {"batch_size": 0}})
    with pytest.raises(CMoEError, match="neither a file nor a built-in config; built-in: paper, tiny"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(CMoEError, match="model: missing required key"):
        config_from_dict({"model": {}, "data": {"synthetic": {}}})
    with pytest.raises(UnknownNameError, match="unknown connector preset 'orignal'; known connector presets"):
        connector_config("orignal", 8, 8, 1)
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed")
    with pytest.raises(CMoEError, match="not valid YAML"):
        load_config(bad)
    assert parse_overrides(["train.steps=7", "model.connector.preset=mlp"]) == {
        "train": {"steps": 7}, "model": {"connector": {"preset": "mlp"}}}


def test_missing_data_root_names_the_file(tmp_path: Path) -> None:
    config = load_config("paper", {"data": {"datasets": [{"name": "slake_vqa", "root": str(tmp_path)}]}})
    with pytest.raises(CMoEError, match=r"slake_vqa: missing .*train\.json"):
        load_split(config.data, "train")


def test_learning_rate_warms_up_linearly_then_follows_a_cosine_to_min_lr() -> None:
    train = TrainSection(steps=110, warmup_steps=10, lr=1e-3, warmup_start_lr=1e-4, min_lr=1e-5)
    assert learning_rate(0, train) == pytest.approx(1e-4)
    assert learning_rate(5, train) == pytest.approx(5.5e-4)
    assert learning_rate(10, train) == pytest.approx(1e-3)
    assert learning_rate(60, train) == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5)
    assert learning_rate(110, train) == pytest.approx(1e-5)


def test_original_connector_preset_matches_the_paper_shapes() -> None:
    config = connector_config("original", 1408, 4096, 4)
    assert config.token_features == 5632 and config.num_experts == 5 and config.top_k is None
    assert (config.router, config.router_gate) == ("task_token", "mlp") and config.num_tasks == 5
    assert connector_config("original_sparse", 1408, 4096, 4).top_k == 2
    assert connector_config("mlp", 1408, 4096, 4).connector_type == "mlp"
    assert set(CONNECTOR_PRESETS) >= {"original", "original_hard", "original_constant", "token_topk", "light"}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    config = tiny_config(tmp_path_factory.mktemp("model"))
    samples = load_split(config.data, "train")
    tokenizer = make_tokenizer(config, samples)
    torch.manual_seed(0)
    return config, samples, build_model(config.model, tokenizer)

@pytest.mark.smoke

def test_loss_covers_answer_tokens_only_and_only_connector_and_lora_train(tiny_model) -> None:
    config, samples, model = tiny_model
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("connector" in n or "lora_" in n or "modules_to_save" in n for n in trainable)
    assert not any(p.requires_grad for p in model.vision_encoder.parameters())
    collator = Collator(model.tokenizer, 32, config.model.image_mean, config.model.image_std, 96)
    picked = [next(s for s in samples if s.task == t) for t in sorted(TASKS)]
    batch = collator(picked)
    assert batch.pixel_values.shape == (5, 3, 32, 32) and batch.task_ids.tolist() == [task_id(s.task) for s in picked]
    out = model(batch)
    assert out.routing_weights.shape == (5, 16, 5)
    torch.testing.assert_close(out.routing_weights.sum(-1), torch.ones(5, 16))
    # The labels are the answer ids (ending in EOS) and nothing else: prompt and visual tokens are -100.
    _, labels, _ = model._sequences(batch, with_answers=True)
    for text, label in zip(batch.texts, labels):
        assert text.answer[-1] == model.tokenizer.eos_token_id
        assert label[label != -100].tolist() == text.answer
        assert (label[:len(label) - len(text.answer)] == -100).all()

@pytest.mark.smoke

def test_batched_greedy_generation_matches_one_by_one(tiny_model) -> None:
    config, samples, model = tiny_model
    model.eval()
    collator = Collator(model.tokenizer, 32, config.model.image_mean, config.model.image_std, 96, with_answers=False)
    picked = [next(s for s in samples if s.task == t) for t in sorted(TASKS)]
    together = model.generate(collator(picked), max_new_tokens=6)
    alone = [model.generate(collator([s]), max_new_tokens=6)[0] for s in picked]
    assert together == alone


@pytest.mark.slow
def test_tiny_training_lowers_loss_on_every_task_resumes_bit_exactly_and_evaluates(tmp_path: Path) -> None:
    run = dict(train__steps=24, train__save_every=12, train__batch_size=8, data__sampler="mixed")
    straight = Trainer(tiny_config(tmp_path / "straight", **run)).train()
    first, last = {}, {}
    for record in straight.history:
        for task, loss in record["task_loss"].items():
            first.setdefault(task, loss)
            last[task] = loss
    assert set(first) == TASKS
    # Every image task's loss falls. QA starts near zero (the pretrained tiny LLM knows the facts: 0.07 here) and
    # the first LoRA updates for the image tasks disturb it a little (0.78 after 24 steps), far below the ~5.6 of
    # an untrained LLM; the demo's 300 steps end at 100 % QA accuracy.
    assert all(last[t] < first[t] for t in TASKS - {"qa"}), (first, last)
    assert first["qa"] < 0.5 and last["qa"] < 1.5, (first, last)
    routed = {t: w for record in straight.history for t, w in record.get("routing", {}).items()}
    assert set(routed) == TASKS - {"qa"} and all(math.isclose(sum(w), 1, rel_tol=1e-4) for w in routed.values())

    # Stop at step 12 (a checkpoint), then resume in a new Trainer: the weights must match bit for bit.
    split = tmp_path / "split"
    Trainer(tiny_config(split, **run)).train(steps=12)
    assert find_latest(split).name == "step_00000012"
    resumed = Trainer(tiny_config(split, **run)).train()
    a = read_checkpoint(straight.checkpoint)["trainable"]
    b = read_checkpoint(resumed.checkpoint)["trainable"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    lines = [json.loads(line) for line in (split / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [r["step"] for r in straight.history]
    assert lines[-1]["loss"] == straight.history[-1]["loss"]

    config = tiny_config(split)
    results = run_evaluation(config)
    assert set(results) == TASKS
    expected = {"qa": {"all/accuracy"}, "vqa": {"closed/accuracy", "all/bleu1", "open/f1"},
                "report": {"bleu4", "meteor", "rouge1", "rouge2", "rougeL", "f1"}, "rec": {"miou", "acc@0.5"},
                "reg": {"bleu4", "f1", "accuracy"}, "cls": {"accuracy"}}
    for task, names in expected.items():
        assert names <= set(results[task])
        assert all(results[task][n].value is not None or results[task][n].note for n in names)
    assert results.path == split / "eval" / f"{resumed.checkpoint.name}-cmoe" and results.step == 24
    table = (results.path / "eval.md").read_text()
    assert f"Checkpoint: {resumed.checkpoint} (step 24)." in table
    assert "| rec | miou |" in table and "| report | rougeL |" in table
    predictions = (results.path / "predictions.jsonl").read_text().splitlines()
    assert all(json.loads(line)["image"] for line in predictions if json.loads(line)["task"] != "qa")
    assert len(predictions) == 6 * len(TASKS)  # eval.limit_per_task = 6 entries of every task


def test_starting_fresh_over_an_existing_run_is_refused(tmp_path: Path) -> None:
    Trainer(tiny_config(tmp_path, train__steps=2, train__save_every=2)).train()
    with pytest.raises(CMoEError, match="already holds checkpoints; resume from them"):
        Trainer(tiny_config(tmp_path, train__steps=4), resume=None).setup()


def test_checkpoint_refuses_another_base_model(tmp_path: Path) -> None:
    result = Trainer(tiny_config(tmp_path, train__steps=1, train__save_every=1)).train()
    other = tiny_config(tmp_path)
    other.model.vision_encoder.options = load_config("tiny_random").model.vision_encoder.options  # random init
    with pytest.raises(CMoEError, match="frozen weights differ"):
        run_evaluation(other, result.checkpoint)
    assert not list(tmp_path.glob(".step_*"))


def test_weight_decay_spares_biases_norms_and_1d_parameters() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2, bias=False))
    decay, no_decay = parameter_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(model[0].weight), id(model[2].weight)}
    assert {id(p) for p in no_decay["params"]} == {id(model[0].bias), id(model[1].weight), id(model[1].bias)}


@pytest.mark.smoke
@pytest.mark.slow
def test_command_line_demo_train_and_eval(tmp_path: Path) -> None:
    import subprocess
    import sys

    small = ["--set", "data.synthetic.num_images=80", "--set", "data.synthetic.eval_images=10",
             "--set", "train.steps=3", "--set", "train.progress=false", "--set", "eval.limit_per_task=3",
             "--set", "eval.max_new_tokens=6", "--set", "eval.coco_caption=false"]
    run = lambda *args: subprocess.run([sys.executable, "-m", "cmoe", "unimed", *args], capture_output=True,
                                       text=True, timeout=300)
    demo = run("demo", "--output-dir", str(tmp_path / "demo"), *small)
    assert demo.returncode == 0, demo.stderr[-2000:]
    for task in TASKS:
        assert f"| {task} |" in demo.stdout
    assert len(list((tmp_path / "demo" / "eval").glob("step_*-cmoe/eval.json"))) == 1
    # --fresh deletes the demo's own run, and nothing else: not a run trained further, not another run
    from cmoe.reference_models.unimed.cli import demo_only_folder, main

    demo_only_folder(tmp_path / "demo")
    (tmp_path / "demo" / "step_99999999").mkdir()  # what `cmoe unimed train --steps ...` would add
    with pytest.raises(CMoEError, match="trained further after the demo"):
        demo_only_folder(tmp_path / "demo")
    other = tmp_path / "other"
    Trainer(tiny_config(other, train__steps=1, train__save_every=1)).train()
    assert main(["demo", "--fresh", "--output-dir", str(other)]) == 2
    assert (other / "latest").is_file() and list(other.glob("step_*"))
    trained = run("train", "--output-dir", str(tmp_path / "cli"), *small)
    assert trained.returncode == 0 and "trained to step 3" in trained.stdout, trained.stderr[-2000:]
    evaluated = run("eval", "--output-dir", str(tmp_path / "cli"), *small)
    assert evaluated.returncode == 0 and "| rec | miou |" in evaluated.stdout
    bad = run("train", "--output-dir", str(tmp_path / "bad"), "--set", "train.precision=fp8")
    assert bad.returncode == 2 and "train.precision: expected fp32, bf16 or fp16" in bad.stderr


def test_accumulation_bf16_autocast_checkpointing_and_grid_pooling_train(tmp_path: Path) -> None:
    config = tiny_config(tmp_path, train__steps=2, train__save_every=2, train__grad_accum=2,
                         train__precision="bf16")
    config.model.gradient_checkpointing = True
    config.model.aggregation.kind = "avg"
    config.model.connector.options = {"expert_hidden": 32, "router_hidden": 32}
    trainer = Trainer(config)
    result = trainer.train()
    assert trainer.model.connector.config.token_features == 32 and trainer.model.connector.config.aggregate_tokens == 1
    assert any(getattr(m, "gradient_checkpointing", False) is True for m in trainer.model.llm.modules())
    assert all(math.isfinite(r["loss"]) for r in result.history) and result.checkpoint.is_dir()
    weights = read_checkpoint(result.checkpoint)["trainable"]
    assert all(torch.isfinite(w).all() for w in weights.values())
