"""`cmoe.attach` on real (tiny) HF multimodal models: LLaVA and Qwen2-VL."""

from __future__ import annotations

import pytest
import torch

import cmoe
from cmoe import CMoEConfig, CMoEConnector, CMoEError
from cmoe.plugins.tiny import llava_inputs, qwen2_vl_inputs, tiny_llava, tiny_qwen2_vl

pytestmark = pytest.mark.smoke  # in the newest-versions stage (.ci/latest)

FAMILIES = {
    "llava": (tiny_llava, llava_inputs, dict(num_experts=3, top_k=2, aggregate_tokens=4, router="task_token",
                                             num_tasks=2, load_balance_coef=0.01)),
    "qwen2_vl": (tiny_qwen2_vl, qwen2_vl_inputs, dict(num_experts=3, top_k=2, router="task_token", num_tasks=2,
                                                      load_balance_coef=0.01)),
}


def projector_of(model):
    inner = model.model
    return inner.multi_modal_projector if hasattr(inner, "multi_modal_projector") else inner.visual.merger


@pytest.mark.parametrize("family", FAMILIES)
def test_attach_forward_train_generate_detach(family: str) -> None:
    torch.manual_seed(0)
    build, make_inputs, options = FAMILIES[family]
    model = build()
    original = projector_of(model)
    # the projection inside the projector is replaced, its pre-processing (Qwen2-VL's ln_q) kept
    replaced = original.mlp if family == "qwen2_vl" else torch.nn.ModuleList([original.linear_1, original.linear_2])
    before = {n for n, _ in model.named_parameters()}
    connector = cmoe.attach(model, **options)
    assert isinstance(connector, CMoEConnector) and getattr(model, "_cmoe_attached") == family

    projector_params = {id(p) for p in projector_of(model).parameters()}
    assert {id(p) for p in connector.parameters()} <= projector_params
    assert not {id(p) for p in replaced.parameters()} & {id(p) for p in model.parameters()}

    inputs = make_inputs(model)
    images = 2
    task_ids = torch.tensor([0, 1])
    out = model(**inputs, task_ids=task_ids)
    assert torch.isfinite(out.loss)
    assert out.cmoe_aux_loss.item() > 0
    assert all(isinstance(r, cmoe.RoutingResult) for r in out.cmoe_routing)

    optim = torch.optim.AdamW(connector.parameters(), lr=3e-3)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in connector.parameters():
        p.requires_grad_(True)
    losses = []
    for _ in range(8):
        out = model(**inputs, task_ids=task_ids)
        optim.zero_grad()
        out.loss.backward()
        optim.step()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0], losses

    model.eval()
    gen_inputs = {k: v for k, v in inputs.items() if k != "labels"}
    with cmoe.using_task_ids(model, task_ids):
        generated = model.generate(**gen_inputs, max_new_tokens=3, do_sample=False)
    assert generated.shape == (images, inputs["input_ids"].shape[1] + 3)

    assert cmoe.detach(model) is connector
    assert projector_of(model) is original
    assert {n for n, _ in model.named_parameters()} == before
    plain = model(**make_inputs(model))
    assert torch.isfinite(plain.loss) and "cmoe_aux_loss" not in plain


def test_llava_aggregation_sets_the_image_token_count() -> None:
    model = tiny_llava()
    assert model.config.image_seq_length == 16
    cmoe.attach(model, aggregate_tokens=4)
    assert model.config.image_seq_length == 4  # 16 patches / 4
    inputs = llava_inputs(model)
    assert (inputs["input_ids"] == model.config.image_token_id).sum() == 8
    cmoe.detach(model)


def test_task_routed_output_depends_on_task() -> None:
    torch.manual_seed(0)
    model = tiny_llava().eval()
    cmoe.attach(model, router="task", num_tasks=3, num_experts=3, aggregate_tokens=4)
    inputs = {k: v[:1] for k, v in llava_inputs(model).items()}
    a = model(**inputs, task_ids=torch.tensor([0])).logits
    b = model(**inputs, task_ids=torch.tensor([2])).logits
    assert not torch.allclose(a, b)
    with pytest.raises(CMoEError, match="task_ids: the attached connector routes by task and got no task ids"):
        model(**inputs)
    with pytest.raises(CMoEError, match=r"task_ids: expected one task id per example or per image, shape \[1\], "
                                        r"got shape \[2\]"):
        model(**inputs, task_ids=torch.tensor([0, 1]))


def test_attach_with_config_or_connector_and_errors() -> None:
    model = tiny_llava()
    with pytest.raises(CMoEError, match="connector in_features: expected the vision feature width 32, got 16"):
        cmoe.attach(model, CMoEConfig(in_features=16, out_features=64))
    with pytest.raises(CMoEError, match="aggregate_tokens: expected a divisor of the 16 visual tokens per image"):
        cmoe.attach(model, CMoEConfig(in_features=32, out_features=64, aggregate_tokens=3))
    connector = CMoEConnector(CMoEConfig(in_features=32, out_features=64))
    assert cmoe.attach(model, connector) is connector
    with pytest.raises(CMoEError, match="already has a cmoe connector attached"):
        cmoe.attach(model, connector)
    cmoe.detach(model)
    with pytest.raises(CMoEError, match="expected a model with a cmoe connector attached"):
        cmoe.detach(model)


def test_unknown_family_lists_attachers() -> None:
    with pytest.raises(CMoEError, match=r"registered attacher knows \(attachers: .*llava.*qwen2_vl.*\), got Linear; "
                                        r"add the family to cmoe.plugins.attach_families.FAMILIES"):
        cmoe.attach(torch.nn.Linear(2, 2))


def test_attached_connector_saves_and_reloads_into_another_model(tmp_path) -> None:
    torch.manual_seed(0)
    model = tiny_llava().eval()
    connector = cmoe.attach(model, num_experts=2, aggregate_tokens=4)
    connector.save_pretrained(tmp_path)
    inputs = {k: v for k, v in llava_inputs(model).items() if k != "labels"}
    expected = model(**inputs).logits
    cmoe.detach(model)
    cmoe.attach(model, cmoe.load_connector(tmp_path))
    assert torch.equal(model(**inputs).logits, expected)
