"""What the inputs of one call of an attached model say about its images, for task ids: how many images the call
carries and how big each is (`images_in_call`), which example each belongs to, one task id per image from ids given
per example or per image (`per_image_task_ids`), how the ids spread over the rows the projection sees (crops, tiles,
frames, patches: `spread_over_rows`), and the micro-batch's share of an accumulated batch (`aux_weight`).

Task ids come one per example (a row of ``input_ids``; text-only rows are ignored) or one per image (or video). When
a batch has as many examples as images, each example carrying one image, the two readings agree. ``cmoe_task_ids``
is the same keyword under a name no wrapper claims: peft's ``PeftModelForCausalLM.forward`` has a ``task_ids``
parameter of its own and does not pass it on.

Pure functions of the inputs; the mechanism that calls them is `cmoe.plugins.attached_model`.
"""

from __future__ import annotations

from typing import Any

import torch

from cmoe.errors import CMoEError

_IMAGE_INPUTS = ("pixel_values", "pixel_values_images")
_VIDEO_INPUTS = ("pixel_values_videos",)


def images_in_call(kwargs: dict[str, Any]) -> tuple[int | None, torch.Tensor | None]:
    """How many images this call carries, and a relative size per image, where the inputs say so."""
    for key in ("image_grid_thw", "video_grid_thw", "grid_thws"):
        grid = kwargs.get(key)
        if isinstance(grid, torch.Tensor) and grid.dim() == 2:
            return grid.shape[0], grid.prod(-1).double()
    sizes = kwargs.get("image_sizes")
    if isinstance(sizes, torch.Tensor) and sizes.dim() == 2:
        return sizes.shape[0], sizes.prod(-1).double()
    pixels = kwargs.get("pixel_values")
    if isinstance(pixels, torch.Tensor) and pixels.dim() in (3, 4):  # [images, C, H, W] or [images, patches, d]
        return pixels.shape[0], None
    if isinstance(pixels, torch.Tensor) and pixels.dim() in (5, 6):  # [batch, images, (tiles,) C, H, W]
        return pixels.shape[0] * pixels.shape[1], None
    videos = kwargs.get("pixel_values_videos")
    if isinstance(videos, torch.Tensor) and videos.dim() == 5:  # [videos, frames, C, H, W]: a task id per video
        return videos.shape[0], None
    return None, None


def anyres_crops(config: Any, sizes: Any) -> torch.Tensor | None:
    """Crops per image of LLaVA-NeXT-style anyres tiling (base image + grid tiles), from ``image_sizes``."""
    if not isinstance(sizes, torch.Tensor) or sizes.dim() != 2:
        return None
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    return torch.tensor([image_size_to_num_patches(size.tolist(), config.image_grid_pinpoints,
                                                   config.vision_config.image_size) for size in sizes])


NO_TASK_IDS = ("task_ids: the attached connector routes by task and got no task ids; pass task_ids=... (one per "
               "example or per image) to the model, or wrap generate in cmoe.using_task_ids(model, ids). A peft "
               "model with task_type='CAUSAL_LM' keeps task_ids for itself: pass cmoe_task_ids=... instead; HF's "
               "Trainer keeps the column when the ids are named so, TRL's SFTTrainer only with "
               "remove_unused_columns=False")
TASK_ID_KEYWORDS = ("task_ids", "cmoe_task_ids")


def _example_rows(kwargs: dict[str, Any]) -> torch.Tensor | None:
    """The call's token ids ``[examples, tokens]`` when it has them."""
    input_ids = kwargs.get("input_ids")
    return input_ids if isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2 else None


def _placeholder_id(config: Any, videos: bool) -> int | None:
    names = ("video_token_id", "video_token_index") if videos else ("image_token_id", "image_token_index")
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def _image_examples(input_ids: torch.Tensor, placeholder: int, images: int,
                    weights: torch.Tensor | None) -> torch.Tensor | None:
    """The example (row of `input_ids`) each image belongs to, from the placeholder tokens in the rows: one run of
    placeholders per image, or placeholders split over the images in proportion to their sizes (equally when
    sizes are unknown). None when neither reading fits."""
    marks = input_ids == placeholder
    starts = marks.clone()
    starts[:, 1:] &= ~marks[:, :-1]
    runs = starts.sum(-1)
    if int(runs.sum()) == images:
        return torch.repeat_interleave(torch.arange(input_ids.shape[0]), runs.cpu())
    counts = marks.sum(-1).cpu()
    total = int(counts.sum())
    if total == 0:
        return None
    sizes = (weights / weights.sum() * total) if weights is not None else torch.full((images,), total / images)
    if not torch.equal(sizes, sizes.round()):
        return None
    tokens = sizes.round().long()
    image_end, row_end = tokens.cumsum(0), counts.cumsum(0)
    rows = torch.searchsorted(row_end, image_end - tokens, right=True)
    if bool((rows >= row_end.shape[0]).any()) or bool((image_end > row_end[rows]).any()):
        return None  # an image would start past the last row or run over its row's end
    return rows


def per_image_task_ids(ids: torch.Tensor, kwargs: dict[str, Any], config: Any, images: int | None,
                       weights: torch.Tensor | None) -> torch.Tensor:
    """One task id per image (or video) from `ids`, given one per example (a row of ``input_ids``: text-only rows
    are ignored) or one per image."""
    input_ids = _example_rows(kwargs)
    if images is None or (input_ids is None and ids.shape[0] == images):
        return ids
    examples = input_ids.shape[0] if input_ids is not None else None
    if ids.shape[0] == examples:
        videos = all(kwargs.get(k) is None for k in _IMAGE_INPUTS)
        placeholder = _placeholder_id(config, videos)
        owner = None if placeholder is None else _image_examples(input_ids, placeholder, images, weights)
        if owner is not None:
            return ids[owner.to(ids.device)]
        if examples == images:
            return ids
        raise CMoEError(f"task_ids: got one per example ({examples}) for {images} images, and the examples' image "
                        "placeholder tokens do not say which example each image belongs to; pass one task id per "
                        f"image, shape [{images}]")
    if ids.shape[0] == images:
        return ids
    if examples is None or examples == images:
        expected = f"one task id per {'image' if examples is None else 'example or per image'}, shape [{images}]"
    else:
        expected = f"one task id per example, shape [{examples}], or per image, shape [{images}]"
    raise CMoEError(f"task_ids: expected {expected}, got shape {list(ids.shape)}")


def check_not_mixed(kwargs: dict[str, Any]) -> None:
    """Task ids are per image; a call carrying images *and* videos projects them in separate connector calls
    whose rows this attacher cannot assign to the right ids, so it refuses rather than route silently wrong."""
    if any(kwargs.get(k) is not None for k in _IMAGE_INPUTS) and any(kwargs.get(k) is not None
                                                                      for k in _VIDEO_INPUTS):
        raise CMoEError("task_ids: this call carries images and videos together, and task ids cannot be mapped "
                        "onto a mixed call's image and video rows; run images and videos in separate calls, "
                        "each with one task id per image (or per video), or drop task_ids for the mixed call")


def given_task_ids(task_ids: Any, cmoe_task_ids: Any) -> torch.Tensor | None:
    """The ids a call was given under either keyword, flat; both at once is refused."""
    if task_ids is not None and cmoe_task_ids is not None:
        raise CMoEError("task_ids: got both task_ids= and cmoe_task_ids=; pass one of them (cmoe_task_ids where a "
                        "wrapper such as peft's PeftModelForCausalLM keeps task_ids for itself)")
    ids = task_ids if task_ids is not None else cmoe_task_ids
    return None if ids is None else torch.as_tensor(ids).reshape(-1)


def spread_over_rows(ids: torch.Tensor, rows: int, image_rows: torch.Tensor | None,
                     image_weights: torch.Tensor | None, family: str) -> torch.Tensor:
    """Per-image task ids spread over the `rows` one projection call sees: one row per image, the crops per image
    (`image_rows`), rows in proportion to the images' sizes, an even split, or one id when all images share it."""
    images = ids.shape[0]
    if rows == images:
        return ids
    if image_rows is not None and image_rows.shape[0] == images and int(image_rows.sum()) == rows:
        return ids.repeat_interleave(image_rows.to(ids.device))
    if image_weights is not None and image_weights.shape[0] == images:
        counts = image_weights * rows / image_weights.sum()
        if torch.equal(counts, counts.round()):
            return ids.repeat_interleave(counts.round().long().to(ids.device))
    if rows % images == 0:
        return ids.repeat_interleave(rows // images)
    if bool((ids == ids[0]).all()):
        return ids[:1].expand(rows)
    raise CMoEError(f"task_ids: expected {images} images to split evenly over the {rows} rows the {family} "
                    f"connector sees, got a split this attacher cannot infer; give the family a 'rows' rule in "
                    "cmoe.plugins.attach_families.FAMILIES")


def aux_weight(kwargs: dict[str, Any]) -> torch.Tensor | None:
    """This micro-batch's share of the accumulated batch's label tokens, when the caller (HF's Trainer) divides
    the language-model loss by those tokens (``num_items_in_batch``); None otherwise."""
    total, labels = kwargs.get("num_items_in_batch"), kwargs.get("shift_labels")
    if labels is None and isinstance(kwargs.get("labels"), torch.Tensor):
        labels = kwargs["labels"][..., 1:]
    if total is None or not isinstance(labels, torch.Tensor):
        return None
    total = torch.as_tensor(total, device=labels.device).reshape(-1)[0]
    return labels.ne(-100).sum() / total.clamp(min=1)
