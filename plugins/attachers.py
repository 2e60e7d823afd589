"""Attachers for HF multimodal families: one generic mechanism, family knowledge as data.

`FamilyAttacher` reads `cmoe.plugins.attach_families.FAMILIES` (where each ``model_type`` keeps its connector);
`NamedConnectorAttacher` is the fallback for unknown families (a module named like a connector, e.g.
``multi_modal_projector``). Both keep the family's own pre-processing (norms, pixel shuffle, pooling, patch
merge, perceiver) and replace only the projection the connector ends with: the last ``nn.Linear`` mapping to
the text width, together with the Linear and activation right before it when they form Linear-act-Linear.

The attached module returns a tensor where the model expects one; its `ConnectorOutput`s of the current call
are kept on an `AttachState`, and hooks on the top-level model pop a ``task_ids=`` keyword (one per image),
add the aux loss to ``output.loss`` and expose ``output.cmoe_aux_loss`` and ``output.cmoe_routing``.
`find_connector_by_dry_run` finds the connector of a model the table does not know, from one forward.
Everything imports transformers lazily: loading the plugin costs nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from cmoe.config import CMoEConfig
from cmoe.connector import ConnectorOutput, PretrainedConnector
from cmoe.errors import CMoEError, expect
from cmoe.plugins.attach_families import CONNECTOR_NAMES, FAMILIES

STATE = "_cmoe_state"
Layers = list[tuple[torch.Tensor, "torch.Tensor | None"]]

_ACTIVATIONS = {
    "GELUActivation": "gelu", "GELUTanh": "gelu_tanh", "PytorchGELUTanh": "gelu_tanh",
    "NewGELUActivation": "gelu_tanh", "FastGELUActivation": "gelu_tanh", "SiLU": "silu", "SiLUActivation": "silu",
    "ReLU": "relu", "QuickGELUActivation": "quick_gelu",
}


def activation_name(module: nn.Module) -> str | None:
    """The `cmoe.experts.ACTIVATIONS` name computing what `module` computes, or None if there is none."""
    if isinstance(module, nn.GELU):
        return "gelu_tanh" if module.approximate == "tanh" else "gelu"
    return _ACTIVATIONS.get(type(module).__name__)


def text_width(model: nn.Module) -> int:
    """The language model's hidden width, read off its input embeddings (no config field assumed)."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    expect(isinstance(embeddings, nn.Embedding), "model", "a model whose get_input_embeddings() is an nn.Embedding",
           type(embeddings).__name__)
    return embeddings.embedding_dim


def _resolve(root: nn.Module, path: str) -> nn.Module | None:
    module = root
    for part in path.split("."):
        module = getattr(module, part, None)
        if not isinstance(module, nn.Module):
            return None
    return module


def _split(path: str) -> tuple[str, str]:
    parent, _, name = path.rpartition(".")
    return parent, name


@dataclass
class Projection:
    """The part of a connector a CMoE replaces: children `names` of `parent` (a Linear, or Linear-act-Linear;
    a single child when the whole module is replaced), with the weights it held and its activation."""

    connector_path: str
    parent: nn.Module
    names: list[str]
    layers: Layers
    activation: str | None
    description: str
    adapter: str | None = None

    @property
    def in_features(self) -> int:
        return self.layers[0][0].shape[1]

    @property
    def out_features(self) -> int:
        return self.layers[-1][0].shape[0]

    def default_options(self) -> dict[str, Any]:
        """CMoE options whose experts have exactly this projection's shape (so they can be upcycled from it)."""
        options: dict[str, Any] = dict(in_features=self.in_features, out_features=self.out_features,
                                       expert_bias=any(b is not None for _, b in self.layers))
        if len(self.layers) == 2:
            options.update(expert="mlp", expert_hidden=self.layers[0][0].shape[0], expert_activation=self.activation)
        else:
            options.update(expert="linear")
        return options


def _linear_layers(*linears: nn.Linear) -> Layers:
    return [(m.weight, m.bias) for m in linears]


def find_projection(model: nn.Module, connector_path: str, projection: str | None = None,
                    adapter: str | None = None) -> Projection:
    """Locate the final projection of the connector at `connector_path` (see the module docstring)."""
    connector = _resolve(model, connector_path)
    expect(connector is not None, "connector path", f"a module at {connector_path!r}", "nothing there")
    width = text_width(model)
    if adapter is not None:
        from cmoe.plugins.attach_adapters import ADAPTERS

        parent_path, name = _split(connector_path)
        layers, activation = ADAPTERS[adapter].layers(connector)
        return Projection(connector_path, _resolve(model, parent_path) if parent_path else model, [name], layers,
                          activation, f"{type(connector).__name__} projection weight (adapter {adapter!r})",
                          adapter)
    if isinstance(connector, nn.Linear):
        parent_path, name = _split(connector_path)
        return Projection(connector_path, _resolve(model, parent_path) if parent_path else model, [name],
                          _linear_layers(connector), None, "the whole connector (Linear)")
    if projection is not None:
        path = projection
    else:
        linears = [n for n, m in connector.named_modules() if isinstance(m, nn.Linear) and m.out_features == width]
        expect(bool(linears), f"connector {connector_path}", f"an nn.Linear with out_features={width} (the text "
               "width) to replace; give the family an adapter in cmoe.plugins.attach_adapters",
               f"{type(connector).__name__} without one")
        path = linears[-1]
    parent_path, name = _split(path)
    parent = _resolve(connector, parent_path) if parent_path else connector
    final = getattr(parent, name)
    expect(isinstance(final, nn.Linear), "projection", "an nn.Linear", type(final).__name__)
    children = list(parent._modules.items())
    index = [n for n, _ in children].index(name)
    if index >= 2:
        (first_name, first), (act_name, act) = children[index - 2], children[index - 1]
        if isinstance(first, nn.Linear) and activation_name(act) and first.out_features == final.in_features:
            description = f"{first_name}-{act_name}-{name} (Linear-{type(act).__name__}-Linear)"
            if isinstance(parent, nn.Sequential) and len(children) == 3 and parent is not connector:
                grand_path, seq_name = _split(parent_path)
                grand = _resolve(connector, grand_path) if grand_path else connector
                return Projection(connector_path, grand, [seq_name], _linear_layers(first, final),
                                  activation_name(act), f"{parent_path} {description}")
            prefix = f"{parent_path}." if parent_path else ""
            return Projection(connector_path, parent, [first_name, act_name, name], _linear_layers(first, final),
                              activation_name(act), prefix + description)
    return Projection(connector_path, parent, [name], _linear_layers(final), None, f"{path} (Linear)")


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


def _install_model_hooks(model: nn.Module, state: AttachState) -> list:
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
            model.register_forward_hook(after, with_kwargs=True)]


class FamilyAttacher:
    """The generic attacher for one family entry (``{"connector": ..., ...}``) of the family table."""

    fallback = False

    def __init__(self, family: str, spec: dict[str, Any] | None = None):
        self.family = family
        self.spec = dict(FAMILIES[family] if spec is None else spec)

    def matches(self, model: nn.Module) -> bool:
        return getattr(getattr(model, "config", None), "model_type", None) == self.family

    def _spec(self, model: nn.Module) -> dict[str, Any]:
        return self.spec

    def _connector_path(self, model: nn.Module) -> str:
        paths = self._spec(model)["connector"]
        for path in [paths] if isinstance(paths, str) else paths:
            if _resolve(model, path) is not None:
                return path
            if path.startswith("model.") and _resolve(model, path[len("model."):]) is not None:
                return path[len("model."):]
        raise CMoEError(f"model: expected the {self.family} connector at {paths!r}, got no such module in "
                        f"{type(model).__name__}; fix the entry of {self.family!r} in "
                        "cmoe.plugins.attach_families.FAMILIES")

    def projection(self, model: nn.Module) -> Projection:
        """The projection a CMoE replaces in `model` (before attaching: the model's own weights)."""
        spec = self._spec(model)
        return find_projection(model, self._connector_path(model), spec.get("projection"), spec.get("adapter"))

    def upcycle_source(self, model: nn.Module) -> tuple[Layers, str | None]:
        """``([(weight [out, in], bias or None), ...], activation)`` of the projection, for upcycling."""
        found = self.projection(model)
        return found.layers, found.activation

    def default_config(self, model: nn.Module, **overrides: Any) -> CMoEConfig:
        options = self.projection(model).default_options()
        options.update(overrides)
        return CMoEConfig(**options)

    def attach(self, model: nn.Module, connector: PretrainedConnector) -> None:
        found = self.projection(model)
        config = connector.config
        fix = "; leave the widths out and cmoe.attach reads them off the replaced projection"
        expect(config.in_features == found.in_features, "connector in_features",
               f"the vision feature width {found.in_features}", f"{config.in_features} (the input width of "
               f"{found.description} in {found.connector_path}){fix}")
        expect(config.out_features == found.out_features, "connector out_features",
               f"the LLM width {found.out_features}", f"{config.out_features}{fix}")
        spec = self._spec(model)
        state = AttachState(self.family, rows=spec.get("rows", "auto"), projection=found.description)
        aggregate = getattr(config, "aggregate_tokens", 1)
        if aggregate != 1:
            count_field = spec.get("image_count_field")
            if count_field is None:
                raise CMoEError(f"aggregate_tokens: expected 1 for {self.family}, got {aggregate}: the family's own "
                                "connector fixes how many image tokens the prompt carries (its pre-processing is kept "
                                "and the processor writes that count); use aggregate_tokens=1")
            per_image = getattr(model.config, count_field, None)
            expect(isinstance(per_image, int) and per_image % aggregate == 0, "aggregate_tokens",
                   f"a divisor of the {per_image} visual tokens per image", aggregate)
            state.config_fields[count_field] = per_image
            setattr(model.config, count_field, per_image // aggregate)

        wrapper = AttachedProjection(connector, state)
        installed: nn.Module = wrapper
        if found.adapter is not None:
            from cmoe.plugins.attach_adapters import ADAPTERS

            installed = ADAPTERS[found.adapter].wrap(getattr(found.parent, found.names[0]), wrapper)
        for i, name in enumerate(found.names):
            state.restore.append((found.parent, name, getattr(found.parent, name)))
            setattr(found.parent, name, installed if i == 0 else nn.Identity())
        state.hooks = _install_model_hooks(model, state)
        model.__dict__[STATE] = state

    def detach(self, model: nn.Module) -> PretrainedConnector:
        state: AttachState = model.__dict__.pop(STATE)
        for handle in state.hooks:
            handle.remove()
        connector = None
        for parent, name, original in state.restore:
            module = getattr(parent, name)
            if connector is None:
                connector = module.connector if isinstance(module, AttachedProjection) else module.projection.connector
            setattr(parent, name, original)
        for name, value in state.config_fields.items():
            setattr(model.config, name, value)
        return connector

    def set_task_ids(self, model: nn.Module, task_ids: torch.Tensor | None) -> None:
        model.__dict__[STATE].sticky_task_ids = None if task_ids is None else task_ids.reshape(-1)


def _language_model_paths(model: nn.Module) -> set[str]:
    paths = set()
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in ("language_model", "text_model", "lm_head"):
            paths.add(name)
    return paths


def _under(name: str, roots: set[str]) -> bool:
    return any(name == r or name.startswith(r + ".") for r in roots)


class NamedConnectorAttacher(FamilyAttacher):
    """Fallback for families missing from the table: the outermost module outside the language model named
    like a connector (`CONNECTOR_NAMES`), handled by the generic mechanism."""

    fallback = True

    def __init__(self) -> None:
        super().__init__("auto", {})

    def _find(self, model: nn.Module) -> str | None:
        if not hasattr(model, "get_input_embeddings"):
            return None
        skip = _language_model_paths(model)
        for name, _ in model.named_modules():
            if name.rsplit(".", 1)[-1] in CONNECTOR_NAMES and not _under(name, skip):
                return name
        return None

    def matches(self, model: nn.Module) -> bool:
        return hasattr(model, "config") and self._find(model) is not None

    def _spec(self, model: nn.Module) -> dict[str, Any]:
        path = self._find(model)
        if path is None:
            raise CMoEError(f"model: expected a module named one of {list(CONNECTOR_NAMES)}, got none in "
                            f"{type(model).__name__}; add the family to cmoe.plugins.attach_families.FAMILIES")
        return {"connector": path}


def _patchifies_pixels(module: nn.Module) -> bool:
    return any(isinstance(m, (nn.Conv2d, nn.Conv3d)) and m.in_channels == 3 for m in module.modules())


def find_connector_by_dry_run(model: nn.Module, inputs: dict[str, Any]) -> str:
    """The dotted path of `model`'s connector found by one forward on `inputs` (see `dry_run`)."""
    return dry_run(model, inputs)[0]


def dry_run(model: nn.Module, inputs: dict[str, Any]) -> tuple[str, Any]:
    """``(connector path, the forward's output)`` from one forward on `inputs`. The connector is, among the
    modules outside the language model whose output has the text width, the last to finish (so the outermost
    of nested ones), leaving out those that patchify pixels themselves (a vision tower ending in a merger has the
    text width too). For families the table does not know yet: put the path it finds into the table."""
    width = text_width(model)
    skip = _language_model_paths(model)
    finished: list[str] = []
    names = {module: name for name, module in model.named_modules()}
    top = {model, getattr(model, "model", None)}

    def record(module: nn.Module, args: tuple, output: Any) -> None:
        if isinstance(output, torch.Tensor) and output.shape[-1] == width:
            finished.append(names[module])

    handles = [m.register_forward_hook(record) for name, m in model.named_modules()
               if m not in top and name and not _under(name, skip) and not isinstance(m, nn.Embedding)
               and not _patchifies_pixels(m)]
    try:
        with torch.no_grad():
            output = model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    expect(bool(finished), "model", f"a module outside the language model with output width {width} during a "
           "forward with images", "none (pass inputs that carry images)")
    return finished[-1], output
