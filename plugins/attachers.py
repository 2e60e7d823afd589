"""Attachers for HF multimodal families: one generic mechanism, family knowledge as data.

`FamilyAttacher` reads `cmoe.plugins.attach_families.FAMILIES` (where each ``model_type`` keeps its connector);
`NamedConnectorAttacher` is the fallback for unknown families (a module named like a connector, e.g.
``multi_modal_projector``). Both keep the family's own pre-processing (norms, pixel shuffle, pooling, patch
merge, perceiver) and replace only the projection the connector ends with: the last ``nn.Linear`` mapping to
the text width, together with the Linear and activation right before it when they form Linear-act-Linear.

The projection is found by `cmoe.plugins.attach_projection`; the attached model's class, and how one of its calls
gets its task ids and adds the aux loss, is `cmoe.plugins.attached_model`. `find_connector_by_dry_run` finds the
connector of a model the table does not know, from one forward. Everything imports transformers lazily: loading
the plugin costs nothing.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from cmoe.config import CMoEConfig
from cmoe.connector import PretrainedConnector
from cmoe.errors import CMoEError, expect
from cmoe.plugins.attach_families import CONNECTOR_NAMES, FAMILIES
from cmoe.plugins.attach_projection import Layers, Projection, find_projection, resolve, text_width
from cmoe.plugins.attached_model import ATTACHMENT, AttachedProjection, Attachment, make_attached, make_detached


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
            if resolve(model, path) is not None:
                return path
            if path.startswith("model.") and resolve(model, path[len("model."):]) is not None:
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
        attachment = Attachment(self.family, rows=spec.get("rows", "auto"), projection=found.description)
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
            attachment.config_fields[count_field] = per_image
            setattr(model.config, count_field, per_image // aggregate)

        wrapper = AttachedProjection(connector, attachment)
        installed: nn.Module = wrapper
        if found.adapter is not None:
            from cmoe.plugins.attach_adapters import ADAPTERS

            installed = ADAPTERS[found.adapter].wrap(getattr(found.parent, found.names[0]), wrapper)
        for i, name in enumerate(found.names):
            attachment.restore.append((found.parent, name, getattr(found.parent, name)))
            setattr(found.parent, name, installed if i == 0 else nn.Identity())
        make_attached(model, attachment)

    def attach_record(self, model: nn.Module) -> dict[str, Any]:
        """What a reload needs besides the connector's config: the model config fields attach changed, as they
        were before."""
        return {"config_fields": dict(model.__dict__[ATTACHMENT].config_fields)}

    def from_pretrained(self, path: Any, record: dict[str, Any], model_class: type | None = None,
                        **options: Any) -> nn.Module:
        """The attached model saved in `path`: ``from_pretrained`` of the attached class, which attaches the
        connector `record` describes as it is constructed, so every saved tensor (connector included) loads by name;
        a folder whose tensors do not match exactly raises."""
        from cmoe.plugins.attach_saving import load_saved_attached

        return load_saved_attached(path, record, model_class, options)

    def detach(self, model: nn.Module) -> PretrainedConnector:
        attachment: Attachment = model.__dict__[ATTACHMENT]
        if any(p.is_meta for _, _, original in attachment.restore for p in original.parameters()):
            raise CMoEError("model: loaded with its connector (cmoe.load_attached), and the projection the connector "
                            "replaced is not saved with it, so detach has nothing to restore; load the base model "
                            "(without cmoe.load_attached) for the original projection")
        parent, name, _ = attachment.restore[0]
        installed = getattr(parent, name)
        connector = installed.connector if isinstance(installed, AttachedProjection) else installed.projection.connector
        if not isinstance(connector, PretrainedConnector):
            raise CMoEError(f"model: its connector is wrapped by {type(connector).__name__} (peft's modules_to_save), "
                            "so detach would hand back the wrapper; call model.merge_and_unload() first and detach "
                            "the model it returns")
        make_detached(model)
        for parent, name, original in attachment.restore:
            setattr(parent, name, original)
        for name, value in attachment.config_fields.items():
            setattr(model.config, name, value)
        return connector

    def set_task_ids(self, model: nn.Module, task_ids: torch.Tensor | None) -> None:
        model.__dict__[ATTACHMENT].sticky_task_ids = None if task_ids is None else task_ids.reshape(-1)


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
