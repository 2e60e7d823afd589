"""An attached model under peft LoRA (issue 23, item 2), with and without ``task_type="CAUSAL_LM"`` (what TRL and
SFT LoRA recipes use): task ids reach the connector, `using_task_ids` and `detach` work on the wrapped model,
HF's Trainer keeps the task-id column, and the trained model saves whole (``merge_and_unload``) and reloads with
`cmoe.load_attached` to the same greedy tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import cmoe
from cmoe import CMoEError
from cmoe.plugins.tiny import llava_inputs, qwen2_vl_inputs, tiny_llava, tiny_qwen2_vl

peft = pytest.importorskip("peft")

OPTIONS = dict(num_experts=4, top_k=2, router="task_token", num_tasks=2, init_noise=0.5)
FAMILIES = {"llava": (tiny_llava, llava_inputs), "qwen2_vl": (tiny_qwen2_vl, qwen2_vl_inputs)}


def _lora(model: torch.nn.Module, task_type: str | None, connector: bool = True) -> torch.nn.Module:
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type=task_type,
                             modules_to_save=["connector"] if connector else None)
    return peft.get_peft_model(model, config)


def _seen(connector: torch.nn.Module) -> list:
    seen: list = []
    connector.router.register_forward_pre_hook(lambda module, args: seen.append(args[1]))
    return seen


@pytest.mark.smoke
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("task_type", [None, "CAUSAL_LM"])
def test_task_ids_reach_the_connector_through_peft(family: str, task_type: str | None) -> None:
    torch.manual_seed(0)
    build, inputs = FAMILIES[family]
    model = build()
    cmoe.attach(model, **OPTIONS)
    wrapped = _lora(model, task_type)
    assert isinstance(wrapped, peft.PeftModelForCausalLM if task_type else peft.PeftModel)
    trained = [n for n, p in wrapped.named_parameters() if p.requires_grad and "connector" in n]
    assert trained and all("modules_to_save" in n for n in trained)
    active = next(m for m in wrapped.modules() if isinstance(m, cmoe.CMoEConnector) and
                  any(p.requires_grad for p in m.parameters()))
    seen = _seen(active)
    batch = inputs(model)
    wrapped(**batch, cmoe_task_ids=torch.tensor([1, 0]))
    assert seen[-1].tolist()[:1] == [1] and set(seen[-1].tolist()) == {0, 1}
    if task_type is None:
        wrapped(**batch, task_ids=torch.tensor([1, 0]))
        assert torch.equal(seen[-1], seen[-2])
    else:  # PeftModelForCausalLM.forward keeps task_ids for itself: the error names the keyword that gets through
        with pytest.raises(CMoEError, match="task_type='CAUSAL_LM' keeps task_ids for itself: pass cmoe_task_ids"):
            wrapped(**batch, task_ids=torch.tensor([1, 0]))
    with cmoe.using_task_ids(wrapped, [0, 1]):
        wrapped.generate(**{k: v for k, v in batch.items() if k != "labels"}, max_new_tokens=2, do_sample=False)
    assert seen[-1].tolist()[:1] == [0]
    assert cmoe.attached_model(wrapped) is model


def test_detach_through_peft_and_its_modules_to_save_wrapper() -> None:
    model = tiny_llava()
    cmoe.attach(model, **OPTIONS)
    plain = _lora(model, "CAUSAL_LM", connector=False)
    assert isinstance(cmoe.detach(plain), cmoe.CMoEConnector)
    assert not hasattr(model.model.multi_modal_projector.linear_1, "connector")

    other = tiny_llava()
    cmoe.attach(other, **OPTIONS)
    wrapped = _lora(other, "CAUSAL_LM")
    with pytest.raises(CMoEError, match="wrapped by ModulesToSaveWrapper.*call model.merge_and_unload"):
        cmoe.detach(wrapped)
    merged = wrapped.merge_and_unload()
    assert isinstance(cmoe.detach(merged), cmoe.CMoEConnector)


@pytest.mark.slow
def test_lora_under_trainer_saves_whole_and_reloads_to_the_same_tokens(tmp_path: Path) -> None:
    from transformers import Trainer, TrainingArguments

    torch.manual_seed(0)
    model = tiny_llava()
    cmoe.attach(model, **OPTIONS)
    wrapped = _lora(model, "CAUSAL_LM")
    active = next(m for m in wrapped.modules() if isinstance(m, cmoe.CMoEConnector) and
                  any(p.requires_grad for p in m.parameters()))
    seen = _seen(active)
    before = {n: p.detach().clone() for n, p in active.named_parameters()}
    batch = llava_inputs(model, batch=4)
    rows = [{**{k: v[i] for k, v in batch.items()}, "cmoe_task_ids": i % 2} for i in range(4)]
    arguments = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=2,
                                  learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True)
    assert arguments.remove_unused_columns
    Trainer(model=wrapped, args=arguments, train_dataset=rows).train()
    assert seen and all(ids is not None for ids in seen)
    assert any(not torch.equal(p, before[n]) for n, p in active.named_parameters())

    merged = wrapped.merge_and_unload().eval()
    prompt = {k: v for k, v in batch.items() if k != "labels"}
    expected = merged.generate(**prompt, task_ids=[0, 1, 1, 0], max_new_tokens=5, do_sample=False)
    merged.save_pretrained(tmp_path / "whole")
    reloaded = cmoe.load_attached(tmp_path / "whole").eval()
    assert torch.equal(reloaded.generate(**prompt, task_ids=[0, 1, 1, 0], max_new_tokens=5, do_sample=False), expected)

    with pytest.raises(CMoEError, match="a peft adapter folder, not a whole model.*PeftModel.from_pretrained"):
        wrapped.save_pretrained(tmp_path / "adapter")
        cmoe.load_attached(tmp_path / "adapter")
