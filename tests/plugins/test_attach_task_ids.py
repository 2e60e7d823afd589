"""Task ids of an attached model in real batches (issue 23, items 2 and 5): one per example for a batch mixing
image and text-only examples (the text-only rows are ignored), one per image as before, under the keyword
``cmoe_task_ids`` as well (peft's ``PeftModelForCausalLM`` keeps ``task_ids`` for itself), and bad input refused
with one clear error."""

from __future__ import annotations

import pytest
import torch

import cmoe
from cmoe import CMoEError
from cmoe.plugins.tiny import llava_inputs, qwen2_vl_inputs, tiny_llava, tiny_qwen2_vl

OPTIONS = dict(num_experts=4, top_k=2, router="task_token", num_tasks=3, init_noise=0.5)


def _seen_task_ids(connector: torch.nn.Module) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    connector.router.register_forward_pre_hook(
        lambda module, args: seen.append(None if args[1] is None else args[1].clone()))
    return seen


def _llava_mixed(model: torch.nn.Module) -> tuple[dict, dict]:
    """Examples 0 and 2 carry an image, example 1 is text only (padded to the same length, no image tokens)."""
    batch = llava_inputs(model, batch=3)
    text_row = torch.randint(3, 900, batch["input_ids"].shape[1:], generator=torch.Generator().manual_seed(1))
    batch["input_ids"][1] = text_row
    batch["labels"][1] = text_row
    mixed = dict(batch, pixel_values=batch["pixel_values"][[0, 2]])
    images_only = {k: v[[0, 2]] for k, v in batch.items()}
    return mixed, images_only


def _qwen_mixed(model: torch.nn.Module) -> tuple[dict, dict]:
    """Three examples with images of different sizes, the middle one replaced by a text-only row."""
    grids = ((1, 4, 4), (1, 4, 8), (1, 8, 4))
    batch = qwen2_vl_inputs(model, grids=grids)
    merge = model.config.vision_config.spatial_merge_size ** 2
    patches = torch.tensor(grids).prod(-1)
    keep = torch.cat([torch.arange(int(patches[:1].sum())), torch.arange(int(patches[:2].sum()), int(patches.sum()))])
    text = torch.randint(3, 900, (batch["input_ids"].shape[1],), generator=torch.Generator().manual_seed(1))
    input_ids = batch["input_ids"].clone()
    input_ids[1] = text
    mm = (input_ids == model.config.image_token_id).int()
    assert int(mm.sum()) == int(patches[[0, 2]].sum()) // merge
    mixed = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                 pixel_values=batch["pixel_values"][keep], image_grid_thw=batch["image_grid_thw"][[0, 2]],
                 mm_token_type_ids=mm)
    rows = [0, 2]
    images_only = dict(input_ids=input_ids[rows], attention_mask=torch.ones_like(input_ids[rows]),
                       pixel_values=mixed["pixel_values"], image_grid_thw=mixed["image_grid_thw"],
                       mm_token_type_ids=mm[rows])
    return mixed, images_only


@pytest.mark.smoke
@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_per_example_ids_in_a_batch_mixing_image_and_text_examples(family: str) -> None:
    torch.manual_seed(0)
    model = (tiny_llava if family == "llava" else tiny_qwen2_vl)().eval()
    connector = cmoe.attach(model, **OPTIONS)
    mixed, images_only = (_llava_mixed if family == "llava" else _qwen_mixed)(model)
    seen = _seen_task_ids(connector)
    with torch.no_grad():
        per_example = model(**mixed, task_ids=torch.tensor([2, 0, 1])).logits
        per_image = model(**mixed, task_ids=torch.tensor([2, 1])).logits
        alone = model(**images_only, task_ids=torch.tensor([2, 1])).logits
        swapped = model(**mixed, task_ids=torch.tensor([1, 0, 2])).logits
    assert seen[0].unique().tolist() == [1, 2] and torch.equal(seen[0], seen[1])  # the text row's id 0 is ignored
    assert torch.equal(per_example, per_image)
    torch.testing.assert_close(per_example[[0, 2]], alone, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(per_example, swapped)  # the ids do route: swapping the examples' tasks changes them


def test_text_only_batch_with_task_ids_runs_and_ignores_them() -> None:
    model = tiny_llava().eval()
    cmoe.attach(model, **OPTIONS)
    batch = llava_inputs(model, batch=2)
    text = torch.randint(3, 900, (2, 8))
    with torch.no_grad():
        with_ids = model(input_ids=text, task_ids=[0, 1]).logits
        without = model(input_ids=text).logits
    assert torch.equal(with_ids, without)
    assert batch["pixel_values"].shape[0] == 2


def test_cmoe_task_ids_is_the_same_keyword_and_both_at_once_is_refused() -> None:
    torch.manual_seed(0)
    model = tiny_llava().eval()
    cmoe.attach(model, **OPTIONS)
    batch = llava_inputs(model, batch=2)
    with torch.no_grad():
        a = model(**batch, task_ids=torch.tensor([0, 2])).logits
        b = model(**batch, cmoe_task_ids=torch.tensor([0, 2])).logits
    assert torch.equal(a, b)
    with pytest.raises(CMoEError, match="got both task_ids= and cmoe_task_ids=; pass one of them"):
        model(**batch, task_ids=[0, 2], cmoe_task_ids=[0, 2])


def test_wrong_task_id_counts_and_missing_ids_get_one_clear_error() -> None:
    model = tiny_llava().eval()
    cmoe.attach(model, **OPTIONS)
    mixed, _ = _llava_mixed(model)
    with pytest.raises(CMoEError, match=r"expected one task id per example, shape \[3\], or per image, shape \[2\], "
                                        r"got shape \[4\]"):
        model(**mixed, task_ids=[0, 1, 2, 0])
    with pytest.raises(CMoEError, match="routes by task and got no task ids.*cmoe_task_ids"):
        model(**mixed)
    unplaced = dict(mixed, input_ids=mixed["input_ids"].masked_fill(mixed["input_ids"] == 999, 5))
    with pytest.raises(CMoEError, match=r"got one per example \(3\) for 2 images.*pass one task id per image"):
        model(**unplaced, task_ids=[0, 1, 2])


def test_generate_takes_per_example_ids_in_using_task_ids_or_as_a_keyword() -> None:
    torch.manual_seed(0)
    model = tiny_llava().eval()
    connector = cmoe.attach(model, **OPTIONS)
    seen = _seen_task_ids(connector)
    mixed, images_only = _llava_mixed(model)
    mixed.pop("labels")
    images_only.pop("labels")
    with cmoe.using_task_ids(model, [2, 0, 1]):
        both = model.generate(**mixed, max_new_tokens=4, do_sample=False)
    with cmoe.using_task_ids(model, [2, 1]):
        alone = model.generate(**images_only, max_new_tokens=4, do_sample=False)
    given = model.generate(**mixed, max_new_tokens=4, do_sample=False, task_ids=[2, 0, 1])
    model.generate(**mixed, max_new_tokens=4, do_sample=False, cmoe_task_ids=[1, 0, 2])
    assert torch.equal(both[[0, 2]], alone) and torch.equal(given, both)
    assert [ids.tolist() for ids in seen] == [[2, 1], [2, 1], [2, 1], [1, 2]]


def test_a_deep_copy_after_a_forward_routes_by_its_own_task_ids() -> None:
    """EMA weights and reference models are deep copies: the copy's hooks must feed the copy's connector."""
    import copy

    torch.manual_seed(0)
    model = tiny_llava()
    connector = cmoe.attach(model, **OPTIONS)
    batch = llava_inputs(model, batch=2)
    model(**batch, task_ids=[0, 1]).loss.backward()
    twin = copy.deepcopy(model)
    seen, twin_seen = _seen_task_ids(connector), _seen_task_ids(cmoe.attached_model(twin).model.multi_modal_projector
                                                                 .linear_1.connector)
    with torch.no_grad():
        out = model(**batch, task_ids=[2, 1]).logits
        twin_out = twin(**batch, task_ids=[2, 1]).logits
        twin(**batch, cmoe_task_ids=[1, 0])
    assert [ids.tolist() for ids in seen] == [[2, 1]]
    assert [ids.tolist() for ids in twin_seen] == [[2, 1], [1, 0]]
    assert torch.equal(out, twin_out)
    cmoe.detach(twin)  # the copy's detach restores the copy only
    assert isinstance(twin.model.multi_modal_projector.linear_1, torch.nn.Linear)
    assert cmoe.attached_model(model) is model and "forward" not in twin.__dict__


def test_a_direct_forward_call_routes_and_adds_the_aux_loss_like_a_call() -> None:
    """peft < 0.21's LoraModel calls ``model.forward(...)`` directly, which skips forward hooks."""
    torch.manual_seed(0)
    model = tiny_llava()
    connector = cmoe.attach(model, **OPTIONS, load_balance_coef=0.01)
    seen = _seen_task_ids(connector)
    batch = llava_inputs(model, batch=2)
    called = model(**batch, cmoe_task_ids=[2, 0])
    direct = model.forward(**batch, cmoe_task_ids=[2, 0])
    assert [ids.tolist() for ids in seen[:2]] == [[2, 0], [2, 0]]
    assert torch.equal(direct.loss, called.loss) and torch.equal(direct.cmoe_aux_loss, called.cmoe_aux_loss)
    assert called.cmoe_aux_loss > 0
    with pytest.raises(CMoEError, match="routes by task and got no task ids"):
        model.forward(**batch)
    assert torch.equal(model(**batch, task_ids=[2, 0]).loss, called.loss)  # no state left over from the failure
