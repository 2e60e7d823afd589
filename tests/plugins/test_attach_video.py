"""`cmoe.attach` on video inputs, end to end, for every family of the installed transformers whose forward takes
``pixel_values_videos`` (tiny random models from `cmoe.plugins.tiny_videos`, two one-video samples; the
Qwen-style videos differ in length).

Per family: the upcycled connector leaves the logits of a video batch unchanged; with randomly initialised
experts routed by task (``hard_task``: task t → expert t), each video's connector rows in the batched call equal
those of that video run alone with its own task id (and differ under the other id), so the per-video task ids
reach exactly that video's frames and patches through the model's own video path; task ids of the wrong length
(one per frame included) raise; with an upcycled ``task_token`` CMoE the loss is the LM loss plus the aux loss
and gradients reach the connector. A LLaVA-NeXT-Video image call with uneven crops before a
video call must not split the video's rows by those crops, and a call mixing images and videos refuses task ids.
"""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch

import cmoe
from cmoe import CMoEError
from cmoe.plugins.tiny_families import _model, prompt, tiny_config
from cmoe.plugins.tiny_videos import LLAVA_STYLE, VIDEO_FAMILIES, build_video

ROUTED = dict(num_experts=4, top_k=2, router="task_token", num_tasks=2, load_balance_coef=0.01)
HARD = dict(num_experts=2, router="hard_task", num_tasks=2, init="random")  # task t → expert t, experts differ


@functools.cache
def tiny_video(family: str):
    """``(model, inputs, reference logits)`` of `family`'s video batch (built once per family)."""
    model, inputs, _ = build_video(family)
    with torch.no_grad():
        return model, inputs, model(**inputs).logits


def one_sample(family: str, inputs: dict[str, Any], index: int) -> dict[str, Any]:
    """Sample `index` of the two-video batch alone: its prompt row and its video only."""
    single = {k: v[index:index + 1] for k, v in inputs.items() if k in ("input_ids", "attention_mask", "labels",
                                                                         "mm_token_type_ids")}
    if family in LLAVA_STYLE:
        single["pixel_values_videos"] = inputs["pixel_values_videos"][index:index + 1]
    else:
        grid = inputs["video_grid_thw"]
        start = int(grid[:index].prod(-1).sum())
        single["pixel_values_videos"] = inputs["pixel_values_videos"][start:start + int(grid[index].prod())]
        single["video_grid_thw"] = grid[index:index + 1]
    return single


def connector_rows(model: torch.nn.Module, connector: torch.nn.Module, inputs: dict[str, Any],
                   task_ids: list[int]) -> torch.Tensor:
    """The connector's output rows (flattened to ``[rows, width]``) in one call of `model`."""
    seen: list[torch.Tensor] = []
    hook = connector.register_forward_hook(lambda m, a, out: seen.append(out.hidden_states.detach()))
    try:
        with torch.no_grad():
            model(**inputs, task_ids=task_ids)
    finally:
        hook.remove()
    assert len(seen) == 1
    return seen[0].reshape(-1, seen[0].shape[-1])


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_upcycled_attach_keeps_video_logits(family: str) -> None:
    model, inputs, reference = tiny_video(family)
    cmoe.attach(model)
    try:
        with torch.no_grad():
            out = model(**inputs, task_ids=[0, 1])
        torch.testing.assert_close(out.logits, reference, rtol=1e-4, atol=1e-5)
    finally:
        cmoe.detach(model)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, reference)


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_task_ids_reach_each_videos_frames(family: str) -> None:
    model, inputs, _ = tiny_video(family)
    torch.manual_seed(0)
    connector = cmoe.attach(model, **HARD)
    try:
        batched = connector_rows(model, connector, inputs, [0, 1])
        alone = [connector_rows(model, connector, one_sample(family, inputs, i), [i]) for i in (0, 1)]
        assert batched.shape[0] == alone[0].shape[0] + alone[1].shape[0]
        torch.testing.assert_close(batched, torch.cat(alone), rtol=1e-4, atol=1e-5)
        swapped = connector_rows(model, connector, one_sample(family, inputs, 0), [1])
        assert not torch.allclose(swapped, alone[0], rtol=1e-2, atol=1e-2 * float(alone[0].abs().max()))
        with pytest.raises(CMoEError, match="task_ids"):
            model(**inputs, task_ids=[0, 1, 1])
        with pytest.raises(CMoEError, match="task_ids"):
            model(**inputs, task_ids=[0, 1, 1, 0])  # one per frame is not one per video
    finally:
        cmoe.detach(model)


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_task_routed_video_loss_and_grads(family: str) -> None:
    model, inputs, reference = tiny_video(family)
    connector = cmoe.attach(model, **ROUTED)
    try:
        out = model(**inputs, task_ids=[0, 1])
        torch.testing.assert_close(out.logits.detach(), reference, rtol=1e-4, atol=1e-5)  # upcycled, task router
        lm = model.loss_function(logits=out.logits, labels=inputs["labels"], vocab_size=out.logits.shape[-1])
        assert torch.isfinite(out.loss) and out.cmoe_aux_loss > 0
        torch.testing.assert_close(out.loss, lm + out.cmoe_aux_loss)
        out.loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in connector.parameters())
        assert any(float(p.grad.abs().sum()) > 0 for p in connector.experts.parameters())
    finally:
        cmoe.detach(model)
        model.zero_grad(set_to_none=True)


def test_video_rows_are_not_split_by_a_previous_image_calls_crops() -> None:
    """LLaVA-NeXT-Video: an image call with 3 and 5 crops, then two 4-frame videos (8 rows, as the crops)."""
    model = _model(tiny_config("llava_next_video", image_grid_pinpoints=[[32, 32], [32, 64], [64, 32], [64, 64]],
                               video_token_id=901))
    pixels = torch.randn(2, 5, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    sizes = torch.tensor([[32, 64], [64, 64]])
    videos = torch.randn(2, 4, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=pixels, image_sizes=sizes).pooler_output
        video_features = model.model.get_video_features(pixel_values_videos=videos).pooler_output
        tokens = video_features.numel() // video_features.shape[-1] // 2
    torch.manual_seed(0)
    connector = cmoe.attach(model, **HARD)
    seen: list[torch.Tensor] = []
    connector.register_forward_pre_hook(lambda m, args: seen.append(args[1]))
    try:
        with torch.no_grad():
            model(**prompt([f.shape[0] for f in features], model.config.image_token_id), pixel_values=pixels,
                  image_sizes=sizes, task_ids=[0, 1])
            assert seen[-1].tolist() == [0] * 3 + [1] * 5
            model(**prompt([tokens] * 2, 901), pixel_values_videos=videos, task_ids=[0, 1])
        assert seen[-1].tolist() == [0] * 4 + [1] * 4
    finally:
        cmoe.detach(model)


def test_a_call_mixing_images_and_videos_refuses_task_ids() -> None:
    model, inputs, _ = tiny_video("qwen2_vl")
    cmoe.attach(model, **HARD)
    try:
        image = dict(pixel_values=torch.randn(16, 128), image_grid_thw=torch.tensor([[1, 4, 4]]))
        with pytest.raises(CMoEError, match="images and videos together"):
            model(**inputs, **image, task_ids=[0, 1])
    finally:
        cmoe.detach(model)
