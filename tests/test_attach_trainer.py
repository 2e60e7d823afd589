"""An attached model fine-tunes under HF's `Trainer` with default `TrainingArguments` (issue 23, item 1): the
Trainer keeps only the batch columns ``model.forward`` names, so the attached model's forward names
``task_ids``; without that the task router raised "got None" although every example carried its task id."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch

import cmoe
from cmoe.plugins.tiny import llava_inputs, tiny_llava

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
