"""One call of an attached model: task ids in (per example or per image), per-row task ids out, the aux loss
added.

Hooks and an instance-level ``forward`` on the attached model (`install_model_hooks`) pop a ``task_ids=`` (or
``cmoe_task_ids=``) keyword, works out how many images the call carries, how big each is and which example each
belongs to, and after the class's forward adds the connector's aux loss to ``output.loss`` and exposes
``output.cmoe_aux_loss`` and ``output.cmoe_routing``. In between, the `AttachedProjection` in the connector asks its `AttachState` for the task id of each row it sees
(crops, tiles, frames, patches).

Task ids come one per example (a row of ``input_ids``; text-only rows are ignored) or one per image (or video).
When a batch has as many examples as images, each example carrying one image, the two readings agree.

``cmoe_task_ids`` is the same keyword under a name no wrapper claims: peft's ``PeftModelForCausalLM.forward``
has a ``task_ids`` parameter of its own and does not pass it on.

Under HF's Trainer with gradient accumulation the language-model loss of a micro-batch is divided by the tokens
of the whole accumulated batch (``num_items_in_batch``); the aux loss is weighted by the micro-batch's share of
those tokens, so over the accumulated batch it counts once, at any accumulation.
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
    """What one attached model needs between its hooks and the attached projection during a call.

    ``sticky_task_ids``: the ids of `cmoe.using_task_ids`; ``image_task_ids``: this call's ids, one per image;
    ``generate_task_ids``: the same for a ``generate`` (it projects images outside any forward); ``hooked``: the
    pre-hook ran for this call; ``aux_weight``: this micro-batch's share of the accumulated batch's tokens;
    ``logged_aux`` / ``logged_calls``: the aux losses of training calls since the Trainer last logged."""

    family: str
    rows: str = "auto"
    sticky_task_ids: torch.Tensor | None = None
    image_weights: torch.Tensor | None = None
    image_rows: torch.Tensor | None = None
    calls: int = 0
    outputs: list[ConnectorOutput] = field(default_factory=list)
    hooks: list = field(default_factory=list)
    restore: list[tuple[nn.Module, str, nn.Module]] = field(default_factory=list)
    config_fields: dict[str, Any] = field(default_factory=dict)
    projection: str = ""
    image_task_ids: torch.Tensor | None = None
    generate_task_ids: torch.Tensor | None = None
    hooked: bool = False
    aux_weight: torch.Tensor | None = None
    logged_aux: torch.Tensor | None = None
    logged_calls: int = 0

    def take_logged_aux(self) -> float | None:
        """The mean aux loss of the training calls since the last take (None if there were none), then reset."""
        if not self.logged_calls:
            return None
        value = float(self.logged_aux) / self.logged_calls
        self.logged_aux, self.logged_calls = None, 0
        return value

    def row_task_ids(self, rows: int, device: torch.device) -> torch.Tensor | None:
        """Per-image task ids spread over the `rows` the projection sees (crops, tiles, frames, patches). Outside
        a call of the model (``generate`` projects images before its first forward) the ids `generate` worked
        out apply, else those of `using_task_ids`, read per image."""
        ids = next((i for i in (self.image_task_ids, self.generate_task_ids, self.sticky_task_ids) if i is not None),
                   None)
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
        try:
            out = self.connector(rows.to(next(self.connector.parameters()).dtype), task_ids)
        except CMoEError as error:
            if task_ids is None and str(error).startswith("task_ids:"):
                raise CMoEError(NO_TASK_IDS) from error
            raise
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


def _given_task_ids(kwargs: dict[str, Any]) -> torch.Tensor | None:
    given = {name: kwargs.pop(name) for name in TASK_ID_KEYWORDS if kwargs.get(name) is not None}
    for name in TASK_ID_KEYWORDS:
        kwargs.pop(name, None)
    if len(given) > 1:
        raise CMoEError("task_ids: got both task_ids= and cmoe_task_ids=; pass one of them (cmoe_task_ids where a "
                        "wrapper such as peft's PeftModelForCausalLM keeps task_ids for itself)")
    return next((torch.as_tensor(ids).reshape(-1) for ids in given.values()), None)


def _aux_weight(kwargs: dict[str, Any]) -> torch.Tensor | None:
    """This micro-batch's share of the accumulated batch's label tokens, when the caller (HF's Trainer) divides
    the language-model loss by those tokens (``num_items_in_batch``); None otherwise."""
    total, labels = kwargs.get("num_items_in_batch"), kwargs.get("shift_labels")
    if labels is None and isinstance(kwargs.get("labels"), torch.Tensor):
        labels = kwargs["labels"][..., 1:]
    if total is None or not isinstance(labels, torch.Tensor):
        return None
    total = torch.as_tensor(total, device=labels.device).reshape(-1)[0]
    return labels.ne(-100).sum() / total.clamp(min=1)


STATE_KEY = "_cmoe_state"
"""Where an attached model keeps its `AttachState` (``model.__dict__``). The hooks and instance methods look it up
on the module they run for, so a deep copy of the model (EMA, a reference model) routes by its own state."""


def _state_of(module: nn.Module, default: AttachState) -> AttachState:
    return module.__dict__.get(STATE_KEY, default)


def _before_call(module: nn.Module, state: AttachState, kwargs: dict[str, Any]) -> None:
    """Take this call's task ids out of `kwargs` and work out, per image, the ids the projection will read."""
    given = _given_task_ids(kwargs)
    ids = given if given is not None else state.sticky_task_ids
    if ids is not None:
        _check_not_mixed(kwargs)
    state.outputs, state.calls = [], 0
    images, state.image_weights = _images_in_call(kwargs)
    state.image_rows = None  # a previous call's crops per image must not split this call's rows
    if state.rows == "anyres" and kwargs.get("pixel_values") is not None:
        state.image_rows = _anyres_crops(module.config, kwargs.get("image_sizes"))
    config = getattr(module, "config", None)
    state.image_task_ids = None if ids is None else per_image_task_ids(ids, kwargs, config, images,
                                                                       state.image_weights)
    state.aux_weight = _aux_weight(kwargs)


def _end_call(state: AttachState) -> tuple[torch.Tensor | None, int]:
    ids, calls = state.image_task_ids, state.calls
    state.image_task_ids, state.calls = None, 0
    return ids, calls


def _after_call(module: nn.Module, state: AttachState, output: Any) -> Any:
    """Check the per-call count and add the connector's aux loss (and routing) to the output."""
    ids, calls = _end_call(state)
    if state.rows == "per_call" and ids is not None and calls:
        expect(calls == ids.shape[0], "task_ids", f"one task id per image, shape [{calls}]",
               f"shape {list(ids.shape)}")
    if not state.outputs or not hasattr(output, "keys"):
        return output
    aux = sum(o.aux_loss for o in state.outputs) / len(state.outputs)
    output["cmoe_aux_loss"] = aux
    output["cmoe_routing"] = [o.routing for o in state.outputs]
    state.outputs = []  # the call's graph lives on in the output only (a deep copy of the model stays possible)
    if module.training:
        logged = aux.detach().float()
        state.logged_aux = logged if state.logged_aux is None else state.logged_aux + logged
        state.logged_calls += 1
    if getattr(output, "loss", None) is not None:
        weighted = aux if state.aux_weight is None else aux * state.aux_weight.to(aux.dtype)
        output["loss"] = output.loss + weighted.to(output.loss.dtype)
    return output


def install_model_hooks(model: nn.Module, state: AttachState) -> list:
    """Take the task ids and add the aux loss around every forward of `model`; returns handles whose ``remove()``
    undoes it. Forward hooks do it for ``model(...)`` — also when a wrapper replaces ``model.forward`` (TRL's fused
    loss) — and the instance-level ``forward`` for a direct ``model.forward(...)``, which skips hooks (peft < 0.21's
    ``LoraModel``). The pre-hook leaves a mark the instance forward takes, so a call is handled once."""
    installed = state

    def before(module: nn.Module, args: tuple, kwargs: dict[str, Any]):
        current = _state_of(module, installed)
        _before_call(module, current, kwargs)
        current.hooked = True
        return args, kwargs

    def after(module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any):
        current = _state_of(module, installed)
        current.hooked = False
        return _after_call(module, current, output)

    handles = [model.register_forward_pre_hook(before, with_kwargs=True),
               model.register_forward_hook(after, with_kwargs=True), _forward_with_task_ids(model, state)]
    if callable(getattr(type(model), "generate", None)):
        handles.append(_generate_with_task_ids(model, state))
    return handles


class _InstanceMethod:
    """A handle like a hook's: ``remove()`` takes an instance-level method (``forward``, ``generate``) away."""

    def __init__(self, model: nn.Module, name: str):
        self.model, self.name = model, name

    def remove(self) -> None:
        self.model.__dict__.pop(self.name, None)


def _generate_with_task_ids(model: nn.Module, installed: AttachState) -> _InstanceMethod:
    """``generate`` taking ``task_ids=`` / ``cmoe_task_ids=`` (or the ids of `using_task_ids`) per example or per
    image. HF's generate projects the images before its first forward, outside the model's forward, so the ids per
    image are worked out here from generate's own inputs."""

    def generate(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        state = _state_of(self, installed)
        given = _given_task_ids(kwargs)
        ids = given if given is not None else state.sticky_task_ids
        if ids is None:
            return type(self).generate(self, *args, **kwargs)
        inputs = dict(kwargs)
        if args and isinstance(args[0], torch.Tensor) and "input_ids" not in inputs:
            inputs["input_ids"] = args[0]
        images, weights = _images_in_call(inputs)
        sticky = state.sticky_task_ids
        state.sticky_task_ids = ids
        state.generate_task_ids = per_image_task_ids(ids, inputs, getattr(self, "config", None), images, weights)
        try:
            return type(self).generate(self, *args, **kwargs)
        finally:
            state.sticky_task_ids, state.generate_task_ids = sticky, None

    generate.__signature__ = inspect.signature(type(model).generate)  # type: ignore[attr-defined]
    generate.__doc__ = type(model).generate.__doc__
    model.__dict__["generate"] = types.MethodType(generate, model)
    return _InstanceMethod(model, "generate")


def _forward_with_task_ids(model: nn.Module, installed: AttachState) -> _InstanceMethod:
    """The attached model's ``forward``: the class's forward between `_before_call` and `_after_call`. Its signature
    names ``task_ids`` and ``cmoe_task_ids``: HF's Trainer keeps only the batch columns ``forward`` names
    (``remove_unused_columns``, on by default; for a peft model it reads the base model's forward)."""
    signature = inspect.signature(type(model).forward)
    parameters = list(signature.parameters.values())
    for name in TASK_ID_KEYWORDS:
        if name not in signature.parameters:
            keyword = inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None)
            at = next((i for i, p in enumerate(parameters) if p.kind is inspect.Parameter.VAR_KEYWORD),
                      len(parameters))
            parameters.insert(at, keyword)

    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        state = _state_of(self, installed)
        if state.hooked:  # called by model(...): the hooks take the ids and add the aux loss
            state.hooked = False
            return type(self).forward(self, *args, **kwargs)
        _before_call(self, state, kwargs)
        try:
            output = type(self).forward(self, *args, **kwargs)
        except BaseException:
            _end_call(state)
            raise
        return _after_call(self, state, output)

    forward.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
    forward.__doc__ = type(model).forward.__doc__
    model.__dict__["forward"] = types.MethodType(forward, model)
    return _InstanceMethod(model, "forward")
