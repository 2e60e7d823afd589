"""One call of an attached model: per-image task ids in, per-row task ids out, the aux loss added.

Hooks on the top-level model (`install_model_hooks`) pop a ``task_ids=`` keyword (one per image, or per video),
work out how many images the call carries and how big each is, and after the forward add the connector's aux
loss to ``output.loss`` and expose ``output.cmoe_aux_loss`` and ``output.cmoe_routing``. In between, the
`AttachedProjection` in the connector asks its `AttachState` for the task id of each row it sees (crops, tiles,
frames, patches).
"""

from __future__ import annotations

import inspect
import types
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from cmoe.connector import ConnectorOutput, PretrainedConnector
from cmoe.errors import CMoEError, expect


@dataclass
class AttachState:
    """What one attached model needs between its hooks and the attached projection during a call."""

    family: str
    rows: str = "auto"
    task_ids: torch.Tensor | None = None
    sticky_task_ids: torch.Tensor | None = None
    image_weights: torch.Tensor | None = None
    image_rows: torch.Tensor | None = None
    calls: int = 0
    outputs: list[ConnectorOutput] = field(default_factory=list)
    hooks: list = field(default_factory=list)
    restore: list[tuple[nn.Module, str, nn.Module]] = field(default_factory=list)
    config_fields: dict[str, Any] = field(default_factory=dict)
    projection: str = ""

    def current_task_ids(self) -> torch.Tensor | None:
        return self.task_ids if self.task_ids is not None else self.sticky_task_ids

    def row_task_ids(self, rows: int, device: torch.device) -> torch.Tensor | None:
        """Per-image task ids spread over the `rows` the projection sees (crops, tiles, frames, patches)."""
        ids = self.current_task_ids()
        if ids is None:
            return None
        ids = ids.to(device)
        images = ids.shape[0]
        if self.rows == "per_call":
            call, self.calls = self.calls, self.calls + 1
            expect(call < images, "task_ids", f"one task id per image (the connector ran for image {call + 1})",
                   f"{images} task ids")
            return ids[call].expand(rows)
        if rows == images:
            return ids
        if self.image_rows is not None and self.image_rows.shape[0] == images and int(self.image_rows.sum()) == rows:
            return ids.repeat_interleave(self.image_rows.to(device))
        weights = self.image_weights
        if weights is not None and weights.shape[0] == images:
            counts = weights * rows / weights.sum()
            if torch.equal(counts, counts.round()):
                return ids.repeat_interleave(counts.round().long().to(device))
        if rows % images == 0:
            return ids.repeat_interleave(rows // images)
        if bool((ids == ids[0]).all()):
            return ids[:1].expand(rows)
        raise CMoEError(f"task_ids: expected {images} images to split evenly over the {rows} rows the {self.family} "
                        f"connector sees, got a split this attacher cannot infer; give the family a 'rows' rule in "
                        "cmoe.plugins.attach_families.FAMILIES")


class AttachedProjection(nn.Module):
    """A CMoE in the place of a family's final projection: ``[..., in] → [..., out]`` (or, with token
    aggregation, ``[rows, N, in] → [rows, N / n, out]``), returning a tensor as the projection did."""

    def __init__(self, connector: PretrainedConnector, state: AttachState):
        super().__init__()
        self.connector = connector
        self.__dict__["state"] = state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        width = x.shape[-1]
        per_row = x.dim() >= 3 and self.state.rows != "tokens"
        rows = x.reshape(-1, x.shape[-2], width) if per_row else x.reshape(-1, 1, width)
        task_ids = self.state.row_task_ids(rows.shape[0], x.device)
        out = self.connector(rows.to(next(self.connector.parameters()).dtype), task_ids)
        self.state.outputs.append(out)
        hidden = out.hidden_states.to(x.dtype)
        if per_row:
            return hidden.reshape(*x.shape[:-2], hidden.shape[-2], hidden.shape[-1])
        return hidden.reshape(*x.shape[:-1], hidden.shape[-1])


def _images_in_call(kwargs: dict[str, Any]) -> tuple[int | None, torch.Tensor | None]:
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


def _anyres_crops(config: Any, sizes: Any) -> torch.Tensor | None:
    """Crops per image of LLaVA-NeXT-style anyres tiling (base image + grid tiles), from ``image_sizes``."""
    if not isinstance(sizes, torch.Tensor) or sizes.dim() != 2:
        return None
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    return torch.tensor([image_size_to_num_patches(size.tolist(), config.image_grid_pinpoints,
                                                   config.vision_config.image_size) for size in sizes])


_IMAGE_INPUTS = ("pixel_values", "pixel_values_images")
_VIDEO_INPUTS = ("pixel_values_videos",)


def _check_not_mixed(kwargs: dict[str, Any]) -> None:
    """Task ids are per image; a call carrying images *and* videos projects them in separate connector calls
    whose rows this attacher cannot assign to the right ids, so it refuses rather than route silently wrong."""
    if any(kwargs.get(k) is not None for k in _IMAGE_INPUTS) and any(kwargs.get(k) is not None
                                                                      for k in _VIDEO_INPUTS):
        raise CMoEError("task_ids: this call carries images and videos together, and task ids cannot be mapped "
                        "onto a mixed call's image and video rows; run images and videos in separate calls, "
                        "each with one task id per image (or per video), or drop task_ids for the mixed call")


def install_model_hooks(model: nn.Module, state: AttachState) -> list:
    def before(module: nn.Module, args: tuple, kwargs: dict[str, Any]):
        task_ids = kwargs.pop("task_ids", None)
        state.task_ids = None if task_ids is None else torch.as_tensor(task_ids).reshape(-1)
        if state.current_task_ids() is not None:
            _check_not_mixed(kwargs)
        state.outputs, state.calls = [], 0
        images, state.image_weights = _images_in_call(kwargs)
        state.image_rows = None  # a previous call's crops per image must not split this call's rows
        if state.rows == "anyres" and kwargs.get("pixel_values") is not None:
            state.image_rows = _anyres_crops(module.config, kwargs.get("image_sizes"))
        ids = state.current_task_ids()
        if ids is not None and images is not None:
            expect(ids.shape[0] == images, "task_ids", f"one task id per image, shape [{images}]",
                   f"shape {list(ids.shape)}")
        return args, kwargs

    def after(module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any):
        ids, calls = state.current_task_ids(), state.calls
        state.task_ids, state.calls = None, 0
        if state.rows == "per_call" and ids is not None and calls:
            expect(calls == ids.shape[0], "task_ids", f"one task id per image, shape [{calls}]",
                   f"shape {list(ids.shape)}")
        if not state.outputs or not hasattr(output, "keys"):
            return output
        aux = sum(o.aux_loss for o in state.outputs) / len(state.outputs)
        output["cmoe_aux_loss"] = aux
        output["cmoe_routing"] = [o.routing for o in state.outputs]
        if getattr(output, "loss", None) is not None:
            output["loss"] = output.loss + aux.to(output.loss.dtype)
        return output

    return [model.register_forward_pre_hook(before, with_kwargs=True),
            model.register_forward_hook(after, with_kwargs=True), _advertise_task_ids(model)]


class _ForwardSignature:
    """A handle like a hook's: ``remove()`` takes the instance-level ``forward`` away again."""

    def __init__(self, model: nn.Module):
        self.model = model

    def remove(self) -> None:
        self.model.__dict__.pop("forward", None)


def _advertise_task_ids(model: nn.Module) -> _ForwardSignature:
    """Give the attached model a ``forward`` whose signature names ``task_ids``: HF's Trainer keeps only the batch
    columns ``forward`` names (``remove_unused_columns``, on by default) and would drop them. The instance-level
    method calls the class's own forward (the pre-hook has popped ``task_ids`` by then)."""
    signature = inspect.signature(type(model).forward)
    parameters = list(signature.parameters.values())
    if "task_ids" not in signature.parameters:
        keyword = inspect.Parameter("task_ids", inspect.Parameter.KEYWORD_ONLY, default=None)
        at = next((i for i, p in enumerate(parameters) if p.kind is inspect.Parameter.VAR_KEYWORD), len(parameters))
        parameters.insert(at, keyword)

    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        return type(self).forward(self, *args, **kwargs)

    forward.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
    forward.__doc__ = type(model).forward.__doc__
    model.__dict__["forward"] = types.MethodType(forward, model)
    return _ForwardSignature(model)
