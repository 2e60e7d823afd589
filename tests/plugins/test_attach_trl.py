"""TRL's SFTTrainer with peft LoRA (``task_type="CAUSAL_LM"``) fine-tunes an attached model (issue 23, item 2):
the examples' task ids reach the connector under ``cmoe_task_ids``, the connector trains (peft's
``modules_to_save``) and the aux loss is logged. SFTTrainer keeps only its own columns unless
``remove_unused_columns=False``, and its collators build batches from those columns: a batch without task ids gets
an error that says how to pass them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import cmoe
from cmoe import CMoEError
from cmoe.plugins.tiny import llava_inputs, tiny_llava

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
peft = pytest.importorskip("peft")


def _tokenizer():
    """A word-level tokenizer over the tiny model's 1000 ids, built offline (SFTTrainer needs a processing class)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({f"w{i}": i for i in range(1000)}, unk_token="w3"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=words, unk_token="w3", pad_token="w0", bos_token="w1",
                                   eos_token="w2")


def _collate(examples: list[dict]) -> dict:
    ids = torch.tensor([e["input_ids"] for e in examples])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "labels": torch.tensor([e["labels"] for e in examples]),
            "pixel_values": torch.tensor([e["pixel_values"] for e in examples]),
            "cmoe_task_ids": torch.tensor([e["cmoe_task_ids"] for e in examples])}


def _trainer(tmp_path: Path, keep_columns: bool, **options):
    from cmoe.plugins.hf_trainer import log_aux_loss

    torch.manual_seed(0)
    model = tiny_llava()
    cmoe.attach(model, num_experts=4, top_k=2, router="task_token", num_tasks=2, load_balance_coef=0.01,
                init_noise=0.5)
    batch = llava_inputs(model, batch=4)
    rows = [{"input_ids": batch["input_ids"][i].tolist(), "labels": batch["labels"][i].tolist(),
             "pixel_values": batch["pixel_values"][i].tolist(), "cmoe_task_ids": i % 2} for i in range(4)]
    config = trl.SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, report_to=[],
                           save_strategy="no", use_cpu=True, logging_steps=1, learning_rate=1e-2,
                           remove_unused_columns=not keep_columns, dataset_kwargs={"skip_prepare_dataset": True})
    lora = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
                           modules_to_save=["connector"])
    trainer = trl.SFTTrainer(model=model, args=config, train_dataset=datasets.Dataset.from_list(rows),
                             processing_class=_tokenizer(), data_collator=_collate, peft_config=lora, **options)
    log_aux_loss(trainer)
    return trainer


@pytest.mark.smoke
@pytest.mark.slow
def test_sft_trainer_with_lora_routes_by_task_and_logs_the_aux_loss(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, keep_columns=True)
    active = next(m for m in trainer.model.modules() if isinstance(m, cmoe.CMoEConnector)
                  and any(p.requires_grad for p in m.parameters()))
    seen: list[torch.Tensor] = []
    active.router.register_forward_pre_hook(lambda module, args: seen.append(args[1]))
    before = {n: p.detach().clone() for n, p in active.named_parameters()}
    trainer.train()
    assert [ids.tolist() for ids in seen] == [[0, 1], [0, 1]]
    assert any(not torch.equal(p, before[n]) for n, p in active.named_parameters())
    logged = [entry["cmoe_aux_loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 2 and all(value > 0 for value in logged)


@pytest.mark.slow
def test_a_collator_dropping_the_task_ids_gets_the_error_that_names_the_fix(tmp_path: Path) -> None:
    """TRL's own collators build batches from their columns only (as a user's collator that forgets the ids)."""
    trainer = _trainer(tmp_path, keep_columns=True)
    trainer.data_collator = lambda examples: {k: v for k, v in _collate(examples).items() if k != "cmoe_task_ids"}
    with pytest.raises(CMoEError, match="remove_unused_columns=False"):
        trainer.train()


@pytest.mark.slow
def test_sft_trainer_trains_the_aux_loss_only_with_the_trainers_own_compute_loss(tmp_path: Path,
                                                                                  monkeypatch) -> None:
    """TRL computes its loss from its fused LM head and never reads ``output.loss``: its loss is the LM loss alone.
    A subclass whose ``compute_loss`` is HF Trainer's (docs/finetune.md) trains ``output.loss``: LM plus aux."""
    from transformers import Trainer

    class SFTTrainerWithAux(trl.SFTTrainer):
        compute_loss = Trainer.compute_loss

    plain = _trainer(tmp_path / "a", keep_columns=True)
    monkeypatch.setattr(trl, "SFTTrainer", SFTTrainerWithAux)
    with_aux = _trainer(tmp_path / "b", keep_columns=True)
    batch = next(iter(plain.get_train_dataloader()))
    for trainer in (plain, with_aux):
        trainer.model.train()
    with torch.no_grad():
        reference = plain.model(**batch)
        aux = reference.cmoe_aux_loss
        assert aux > 0
        lm_alone = plain.compute_loss(plain.model, dict(batch))
        trained = with_aux.compute_loss(with_aux.model, dict(batch))
    torch.testing.assert_close(lm_alone, reference.loss - aux, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(trained, reference.loss, rtol=1e-5, atol=1e-6)
    with_aux.train()
    logged = [entry["cmoe_aux_loss"] for entry in with_aux.state.log_history if "loss" in entry]
    assert len(logged) == 2 and all(value > 0 for value in logged)
