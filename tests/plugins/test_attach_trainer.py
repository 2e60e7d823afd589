"""An attached model fine-tunes under HF's `Trainer` with default `TrainingArguments` (issue 23, item 1): the
Trainer keeps only the batch columns ``model.forward`` names, so the attached model's forward names
``task_ids``; without that the task router raised "got None" although every example carried its task id."""

from __future__ import annotations

import importlib.util
import inspect
from pathlib import Path

import pytest
import torch

import cmoe
from cmoe.plugins.tiny import llava_inputs, qwen2_vl_inputs, tiny_llava, tiny_qwen2_vl

pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate")


class Examples(torch.utils.data.Dataset):
    """One example per image, each with its own task id, as a user's dataset yields them."""

    def __init__(self, model: torch.nn.Module, count: int = 8):
        batch = llava_inputs(model, batch=count)
        self.rows = [{**{k: v[i] for k, v in batch.items()}, "task_ids": i % 2} for i in range(count)]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        return self.rows[index]


def test_the_attached_forward_names_task_ids_and_detach_takes_it_away() -> None:
    model = tiny_llava()
    assert "task_ids" not in inspect.signature(model.forward).parameters
    cmoe.attach(model, num_experts=2)
    parameters = inspect.signature(model.forward).parameters
    assert "task_ids" in parameters and "pixel_values" in parameters and "labels" in parameters
    cmoe.detach(model)
    assert "forward" not in model.__dict__ and "task_ids" not in inspect.signature(model.forward).parameters


@pytest.mark.slow
def test_trainer_with_default_arguments_routes_by_the_examples_task_ids(tmp_path: Path) -> None:
    from transformers import Trainer, TrainingArguments

    model = tiny_llava()
    connector = cmoe.attach(model, num_experts=4, top_k=2, router="task_token", num_tasks=2)
    seen: list[torch.Tensor] = []
    connector.router.register_forward_pre_hook(lambda module, args: seen.append(args[1]))
    before = {name: p.detach().clone() for name, p in connector.named_parameters()}
    arguments = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4,
                                  report_to=[], save_strategy="no", use_cpu=True, logging_steps=1)
    assert arguments.remove_unused_columns  # the default the issue reports
    Trainer(model=model, args=arguments, train_dataset=Examples(model)).train()
    assert seen, "the router never ran"
    assert all(ids is not None for ids in seen)
    assert any(not torch.equal(p, before[name]) for name, p in connector.named_parameters())


def _qwen_examples(model: torch.nn.Module, count: int = 4) -> list[dict]:
    batch = qwen2_vl_inputs(model, grids=((1, 4, 4),) * count)
    patches = batch["pixel_values"].shape[0] // count
    rows = []
    for i in range(count):
        row = {k: v[i] for k, v in batch.items() if k not in ("pixel_values", "image_grid_thw")}
        row.update(pixel_values=batch["pixel_values"][i * patches:(i + 1) * patches],
                   image_grid_thw=batch["image_grid_thw"][i], task_ids=i % 2)
        rows.append(row)
    return rows


def _collate_qwen(rows: list[dict]) -> dict:
    """Qwen2-VL's pixel rows of all images are concatenated, one grid row per image."""
    batch = {k: torch.stack([torch.as_tensor(r[k]) for r in rows]) for k in rows[0] if k != "pixel_values"}
    batch["pixel_values"] = torch.cat([r["pixel_values"] for r in rows])
    return batch


def _checkpointing_argument() -> str:
    from transformers import TrainingArguments

    fields = TrainingArguments.__dataclass_fields__
    return "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"


CHECKPOINTING = _checkpointing_argument() if importlib.util.find_spec("transformers") else "gradient_checkpointing"


def _train(family: str, tmp_path: Path, accumulation: int, checkpointing: bool = False) -> tuple[dict, list]:
    """One SGD step over the same four examples, as one batch or as `accumulation` micro-batches; the aux loss is
    a heavily weighted router z-loss (a mean over tokens, so a mean over equal micro-batches equals the whole's)."""
    from transformers import Trainer, TrainingArguments

    from cmoe.plugins.hf_trainer import log_aux_loss

    torch.manual_seed(0)
    model = tiny_llava() if family == "llava" else tiny_qwen2_vl()
    connector = cmoe.attach(model, num_experts=4, top_k=2, router="task_token", num_tasks=2, load_balance_coef=0.0,
                            z_loss_coef=1.0, init_noise=0.5)
    rows = Examples(model, count=4).rows if family == "llava" else _qwen_examples(model)
    arguments = TrainingArguments(output_dir=str(tmp_path / f"{family}-{accumulation}"), max_steps=1,
                                  per_device_train_batch_size=4 // accumulation,
                                  gradient_accumulation_steps=accumulation, optim="sgd", learning_rate=0.5,
                                  max_grad_norm=0.0, report_to=[], save_strategy="no", use_cpu=True, logging_steps=1,
                                  **{CHECKPOINTING: checkpointing})
    trainer = Trainer(model=model, args=arguments, train_dataset=rows,
                      data_collator=None if family == "llava" else _collate_qwen)
    log_aux_loss(trainer)
    trainer.train()
    checkpointed = any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    assert checkpointed == checkpointing
    return {n: p.detach().clone() for n, p in connector.named_parameters()}, trainer.state.log_history


@pytest.mark.smoke
@pytest.mark.slow
@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_gradient_accumulation_weighs_the_aux_loss_the_same_and_logs_it(family: str, tmp_path: Path) -> None:
    whole, whole_log = _train(family, tmp_path, accumulation=1)
    accumulated, accumulated_log = _train(family, tmp_path, accumulation=2)
    for name, value in whole.items():
        torch.testing.assert_close(accumulated[name], value, rtol=1e-4, atol=1e-6, msg=name)
    aux = [entry["cmoe_aux_loss"] for entry in (whole_log[0], accumulated_log[0])]
    assert aux[0] > 0.1 and aux[1] == pytest.approx(aux[0], rel=1e-4)
    assert whole_log[0]["loss"] == pytest.approx(accumulated_log[0]["loss"], rel=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_gradient_checkpointing_trains_the_connector_with_the_same_gradients(family: str, tmp_path: Path) -> None:
    plain, _ = _train(family, tmp_path, accumulation=1)
    checkpointed, log = _train(family, tmp_path / "gc", accumulation=2, checkpointing=True)
    for name, value in plain.items():
        torch.testing.assert_close(checkpointed[name], value, rtol=1e-4, atol=1e-6, msg=name)
    assert "cmoe_aux_loss" in log[0]


@pytest.mark.slow
def test_a_model_trained_in_bf16_still_runs_after_detach(tmp_path: Path) -> None:
    """accelerate's mixed precision leaves its wrapper of the attached forward on the instance after training;
    after detach that wrapper runs the model's own forward, and task ids are refused with the reason."""
    from transformers import Trainer, TrainingArguments

    from cmoe import CMoEError

    torch.manual_seed(0)
    model = tiny_llava()
    batch = llava_inputs(model, batch=2)
    cmoe.attach(model, num_experts=4, top_k=2, router="task_token", num_tasks=2)
    arguments = TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4,
                                  report_to=[], save_strategy="no", use_cpu=True, bf16=True)
    Trainer(model=model, args=arguments, train_dataset=Examples(model)).train()
    assert "forward" in model.__dict__  # accelerate's wrapper
    projector = model.model.multi_modal_projector
    cmoe.detach(model)
    with torch.no_grad():
        after = model(**batch).logits
    assert isinstance(projector.linear_1, torch.nn.Linear)
    assert after.shape[:2] == batch["input_ids"].shape and bool(torch.isfinite(after).all())
    with pytest.raises(CMoEError, match="was detached"):
        model(**batch, task_ids=[0, 1])
