"""`cmoe.attach` with real (saved and reloaded) weights, next to peft LoRA, through the fallback attacher, and
its bad-input errors; on tiny random models of families other than LLaVA."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import cmoe
from cmoe import CMoEError
from cmoe.plugins.tiny_families import build

pytestmark = pytest.mark.smoke  # in the newest-versions stage (.ci/latest)

TASK_OPTIONS = dict(num_experts=4, top_k=2, router="task_token", num_tasks=2, load_balance_coef=0.01)


def logits(model: torch.nn.Module, inputs: dict, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, **kwargs).logits


@pytest.mark.slow
def test_saved_model_attach_train_save_connector_reattach_gives_identical_logits(tmp_path) -> None:
    from transformers import AutoModelForImageTextToText

    model, inputs = build("qwen2_vl")
    model.save_pretrained(tmp_path / "base")
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "base").eval()
    assert torch.equal(logits(loaded, inputs), logits(model, inputs))

    connector = cmoe.attach(loaded, **TASK_OPTIONS)
    optim = torch.optim.AdamW(connector.parameters(), lr=1e-2)
    loaded(**inputs, task_ids=[0, 1]).loss.backward()
    optim.step()
    trained = logits(loaded, inputs, task_ids=[0, 1])
    assert not torch.allclose(trained, logits(model, inputs))
    connector.save_pretrained(tmp_path / "connector")

    fresh = AutoModelForImageTextToText.from_pretrained(tmp_path / "base").eval()
    cmoe.attach(fresh, cmoe.load_connector(tmp_path / "connector"))
    assert torch.equal(logits(fresh, inputs, task_ids=[0, 1]), trained)


def test_peft_lora_on_the_language_model_next_to_the_connector() -> None:
    from peft import LoraConfig, get_peft_model

    model, inputs = build("smolvlm")
    connector = cmoe.attach(model, **TASK_OPTIONS)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=r".*text_model.*\.(q_proj|v_proj)")
    peft_model = get_peft_model(model, lora)
    for p in connector.parameters():
        p.requires_grad_(True)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert all("lora_" in n or ".connector." in n for n in trainable)
    assert any("lora_" in n for n in trainable) and any(".connector." in n for n in trainable)
    out = peft_model(**inputs, task_ids=[0, 1])
    assert out.cmoe_aux_loss > 0
    out.loss.backward()
    assert connector.experts.weights[0].grad is not None
    assert all(p.grad is not None for n, p in peft_model.named_parameters() if "lora_B" in n)


def test_upcycled_experts_start_at_the_original_and_random_or_noise_move_away() -> None:
    model, inputs = build("internvl")
    reference = logits(model, inputs)
    connector = cmoe.attach(model, num_experts=3, router="token_topk", top_k=2)
    weights = connector.experts.weights[0]
    assert torch.equal(weights[0], weights[1]) and torch.equal(weights[0], weights[2])
    torch.testing.assert_close(logits(model, inputs), reference, rtol=1e-4, atol=1e-5)
    cmoe.detach(model)

    cmoe.attach(model, init="random")
    assert not torch.allclose(logits(model, inputs), reference, rtol=1e-3, atol=1e-3)
    cmoe.detach(model)

    noisy = cmoe.attach(model, init="upcycle", init_noise=0.01)
    assert not torch.equal(noisy.experts.weights[0][0], noisy.experts.weights[0][1])
    torch.testing.assert_close(logits(model, inputs), reference, rtol=0.05, atol=0.05)
    cmoe.detach(model)


def test_fallback_attacher_finds_a_connector_by_name_on_an_unknown_family() -> None:
    model, inputs = build("aya_vision")
    reference = logits(model, inputs)
    model.config.model_type = "my_new_family"
    cmoe.attach(model)
    assert getattr(model, "_cmoe_attached") == "auto"
    torch.testing.assert_close(logits(model, inputs, task_ids=[0, 1]), reference, rtol=1e-4, atol=1e-5)
    cmoe.detach(model)


def test_bad_input_errors_name_the_fix() -> None:
    model, inputs = build("smolvlm")
    with pytest.raises(CMoEError, match=r"aggregate_tokens: expected 1 for smolvlm, got 4.*use aggregate_tokens=1"):
        cmoe.attach(model, aggregate_tokens=4)
    with pytest.raises(CMoEError, match=r"init: expected a connector whose experts have the replaced projection's "
                                        r"shapes.*pass init='random'"):
        cmoe.attach(model, init="upcycle", expert="mlp")
    with pytest.raises(CMoEError, match=r"init: expected one of \('auto', 'upcycle', 'random'\), got 'copy'"):
        cmoe.attach(model, init="copy")
    with pytest.raises(CMoEError, match=r"connector out_features: expected the LLM width 64, got 32; leave the "
                                        r"widths out"):
        cmoe.attach(model, cmoe.CMoEConfig(in_features=128, out_features=32))
    with pytest.raises(CMoEError, match=r"connector in_features: expected the vision feature width 128, got 32 "
                                        r"\(the input width of modality_projection.proj"):
        cmoe.attach(model, cmoe.CMoEConfig(in_features=32, out_features=64))
    assert not hasattr(model, "_cmoe_attached")
    cmoe.attach(model)
    with pytest.raises(CMoEError, match="already has a cmoe connector attached; call cmoe.detach"):
        cmoe.attach(model)
    with pytest.raises(CMoEError, match=r"task_ids: expected one task id per example or per image, shape \[2\], "
                                        r"got shape \[1\]"):
        model(**inputs, task_ids=[0])
    cmoe.detach(model)

    from transformers import LlamaConfig, LlamaForCausalLM

    text_only = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=4, vocab_size=100))
    with pytest.raises(CMoEError, match=r"expected a multimodal model a registered attacher knows.*got "
                                        r"LlamaForCausalLM; add the family to cmoe.plugins.attach_families"):
        cmoe.attach(text_only)


def test_anyres_task_ids_per_image_reach_every_crop() -> None:
    from cmoe.plugins.tiny_families import llava_next_mixed_sizes

    model, inputs = llava_next_mixed_sizes()
    connector = cmoe.attach(model, router="task", num_tasks=3, num_experts=3)
    seen = []
    handle = connector.register_forward_pre_hook(lambda module, args: seen.append(args[1].clone()))
    out = model(**inputs, task_ids=[2, 1])
    handle.remove()
    assert torch.isfinite(out.loss)
    assert seen[0].tolist() == [2, 2, 1, 1, 1]  # 2 crops of the 32×32 image, 3 of the 32×64 one
    cmoe.detach(model)


def test_task_ids_on_a_call_mixing_images_and_videos_are_refused_not_misrouted() -> None:
    from cmoe.plugins.attached_model import Attachment, make_attached

    class Model(nn.Module):
        def forward(self, pixel_values=None, pixel_values_videos=None):
            return {"logits": torch.zeros(1)}

    model = Model()
    make_attached(model, Attachment("video_llava"))
    images, videos = torch.zeros(2, 3, 8, 8), torch.zeros(1, 4, 3, 8, 8)
    with pytest.raises(CMoEError, match="images and videos together.*separate calls"):
        model(pixel_values=images, pixel_values_videos=videos, task_ids=[0, 1])
    model(pixel_values=images, pixel_values_videos=videos)  # without task ids a mixed call is fine
    model(pixel_values_videos=videos, task_ids=[1])         # and so are task ids on videos alone
    model(pixel_values=images, task_ids=[0, 1])
