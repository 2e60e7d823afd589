"""Attachers for HF multimodal families: LLaVA (``multi_modal_projector``) and Qwen2-VL (the vision
tower's patch ``merger``).

The attached connector sits where the model expects a plain projector, so it returns a tensor; its
`ConnectorOutput`s of the current call are kept on the wrapper, and hooks on the top-level model pop a
``task_ids=`` keyword, add the aux loss to ``output.loss`` and expose ``output.cmoe_aux_loss`` and
``output.cmoe_routing``. Everything imports transformers lazily: loading the plugin costs nothing.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from cmoe.config import CMoEConfig
from cmoe.connector import ConnectorOutput, PretrainedConnector
from cmoe.errors import CMoEError, expect


class AttachedConnector(nn.Module):
    """A cmoe connector in a projector's place: returns hidden states, remembers the full outputs."""

    def __init__(self, connector: PretrainedConnector):
        super().__init__()
        self.connector = connector
        self.task_ids: torch.Tensor | None = None
        self.sticky_task_ids: torch.Tensor | None = None
        self.outputs: list[ConnectorOutput] = []
        self.hooks: list = []

    def remember_original(self, module: nn.Module, **state: Any) -> None:
        """Keep the replaced module for `detach` without registering it (its parameters stay out of the model)."""
        self.__dict__["original"] = module
        self.__dict__["original_state"] = state

    def project(self, features: torch.Tensor, task_ids: torch.Tensor | None) -> torch.Tensor:
        """Run the connector on ``[images, tokens, in]`` and keep its output for the model-level hooks."""
        out = self.connector(features.to(next(self.connector.parameters()).dtype), task_ids)
        self.outputs.append(out)
        return out.hidden_states

    def current_task_ids(self, images: int, device: torch.device) -> torch.Tensor | None:
        task_ids = self.task_ids if self.task_ids is not None else self.sticky_task_ids
        if task_ids is None:
            return None
        task_ids = task_ids.to(device)
        expect(task_ids.shape == (images,), "task_ids", f"one task id per image, shape [{images}]",
               f"shape {list(task_ids.shape)}")
        return task_ids


class _HookedAttacher:
    """Shared mechanics: the model-level hooks and the bookkeeping to undo everything on detach."""

    def _wrapper(self, model: nn.Module) -> AttachedConnector:
        raise NotImplementedError

    def _install_hooks(self, model: nn.Module, wrapper: AttachedConnector) -> list:
        def before(module: nn.Module, args: tuple, kwargs: dict[str, Any]):
            task_ids = kwargs.pop("task_ids", None)
            wrapper.task_ids = None if task_ids is None else torch.as_tensor(task_ids)
            wrapper.outputs = []
            return args, kwargs

        def after(module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any):
            wrapper.task_ids = None
            if not wrapper.outputs or not hasattr(output, "keys"):
                return output
            aux = sum(o.aux_loss for o in wrapper.outputs) / len(wrapper.outputs)
            output["cmoe_aux_loss"] = aux
            output["cmoe_routing"] = [o.routing for o in wrapper.outputs]
            if getattr(output, "loss", None) is not None:
                output["loss"] = output.loss + aux.to(output.loss.dtype)
            return output

        return [model.register_forward_pre_hook(before, with_kwargs=True),
                model.register_forward_hook(after, with_kwargs=True)]

    def set_task_ids(self, model: nn.Module, task_ids: torch.Tensor | None) -> None:
        self._wrapper(model).sticky_task_ids = task_ids


class LlavaAttacher(_HookedAttacher):
    """LLaVA-family models (``model.model.multi_modal_projector``): the projector becomes the CMoE. With
    ``aggregate_tokens = n`` each image yields ``N / n`` embeddings, so prompts carry that many image tokens
    (``config.image_seq_length`` is updated to match)."""

    @staticmethod
    def _inner(model: nn.Module) -> nn.Module:
        return model.model if hasattr(model, "model") and hasattr(model.model, "multi_modal_projector") else model

    def matches(self, model: nn.Module) -> bool:
        return hasattr(self._inner(model), "multi_modal_projector") and hasattr(model, "config") \
            and hasattr(model.config, "vision_config")

    def _features_per_image(self, model: nn.Module) -> int:
        vision = model.config.vision_config
        patches = (vision.image_size // vision.patch_size) ** 2
        return patches if model.config.vision_feature_select_strategy == "default" else patches + 1

    def default_config(self, model: nn.Module, **overrides: Any) -> CMoEConfig:
        config = model.config
        layers = 1 if isinstance(config.vision_feature_layer, int) else len(config.vision_feature_layer)
        options = dict(in_features=config.vision_config.hidden_size * layers,
                       out_features=config.text_config.hidden_size)
        options.update(overrides)
        return CMoEConfig(**options)

    def _wrapper(self, model: nn.Module) -> AttachedConnector:
        return self._inner(model).multi_modal_projector

    def attach(self, model: nn.Module, connector: PretrainedConnector) -> None:
        inner = self._inner(model)
        expected = self.default_config(model)
        expect(connector.config.in_features == expected.in_features, "connector in_features",
               f"the vision feature width {expected.in_features}", connector.config.in_features)
        expect(connector.config.out_features == expected.out_features, "connector out_features",
               f"the LLM width {expected.out_features}", connector.config.out_features)
        per_image = self._features_per_image(model)
        aggregate = connector.config.aggregate_tokens
        expect(per_image % aggregate == 0, "aggregate_tokens",
               f"a divisor of the {per_image} visual tokens per image", aggregate)

        wrapper = LlavaProjector(connector)
        wrapper.remember_original(inner.multi_modal_projector,
                                  image_seq_length=getattr(model.config, "image_seq_length", None))
        wrapper.hooks = self._install_hooks(model, wrapper)
        inner.multi_modal_projector = wrapper
        model.config.image_seq_length = per_image // aggregate

    def detach(self, model: nn.Module) -> PretrainedConnector:
        inner = self._inner(model)
        wrapper = inner.multi_modal_projector
        for handle in wrapper.hooks:
            handle.remove()
        inner.multi_modal_projector = wrapper.original
        model.config.image_seq_length = wrapper.original_state["image_seq_length"]
        return wrapper.connector


class LlavaProjector(AttachedConnector):
    """``features [images, N, in]`` → ``[images, N / aggregate, out]``, as LLaVA's projector returns."""

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.project(features, self.current_task_ids(features.shape[0], features.device))


class Qwen2VLAttacher(_HookedAttacher):
    """Qwen2-VL / Qwen2.5-VL (``model.model.visual.merger``): the merger's MLP becomes the CMoE with
    ``aggregate_tokens = spatial_merge_size²`` — the merger's own grouping of consecutive patches — while its
    input norm ``ln_q`` is kept. Images of different sizes are projected one by one."""

    @staticmethod
    def _visual(model: nn.Module) -> nn.Module | None:
        inner = getattr(model, "model", model)
        visual = getattr(inner, "visual", None)
        return visual if visual is not None and hasattr(visual, "merger") else None

    def matches(self, model: nn.Module) -> bool:
        visual = self._visual(model)
        return visual is not None and hasattr(visual.merger, "ln_q") and hasattr(visual.merger, "mlp")

    def default_config(self, model: nn.Module, **overrides: Any) -> CMoEConfig:
        merger = self._visual(model).merger
        linears = [m for m in merger.mlp.modules() if isinstance(m, nn.Linear)]
        group = self._visual(model).spatial_merge_size ** 2
        options = dict(in_features=merger.hidden_size // group, out_features=linears[-1].out_features,
                       aggregate_tokens=group)
        options.update(overrides)
        return CMoEConfig(**options)

    def _wrapper(self, model: nn.Module) -> AttachedConnector:
        return self._visual(model).merger

    def attach(self, model: nn.Module, connector: PretrainedConnector) -> None:
        visual = self._visual(model)
        expected = self.default_config(model)
        for field in ("in_features", "out_features", "aggregate_tokens"):
            expect(getattr(connector.config, field) == getattr(expected, field), f"connector {field}",
                   f"{getattr(expected, field)} for this Qwen2-VL merger", getattr(connector.config, field))
        wrapper = Qwen2VLMerger(connector, visual.merger.ln_q)
        wrapper.remember_original(visual.merger)
        wrapper.hooks = self._install_hooks(model, wrapper)

        def remember_grid(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            wrapper.grid_thw = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)

        wrapper.hooks.append(visual.register_forward_pre_hook(remember_grid, with_kwargs=True))
        visual.merger = wrapper

    def detach(self, model: nn.Module) -> PretrainedConnector:
        visual = self._visual(model)
        wrapper = visual.merger
        for handle in wrapper.hooks:
            handle.remove()
        visual.merger = wrapper.original
        return wrapper.connector


class Qwen2VLMerger(AttachedConnector):
    """``patches [Σ t·h·w, in]`` (all images concatenated) → ``[Σ t·h·w / merge², out]``."""

    def __init__(self, connector: PretrainedConnector, ln_q: nn.Module):
        super().__init__(connector)
        self.ln_q = ln_q
        self.grid_thw: torch.Tensor | None = None

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        if self.grid_thw is None:
            raise CMoEError("grid_thw: expected the vision tower to be called with grid_thw, got none")
        sizes = self.grid_thw.prod(-1).tolist()
        task_ids = self.current_task_ids(len(sizes), patches.device)
        chunks = self.ln_q(patches).split(sizes)
        outs = [self.project(chunk[None], None if task_ids is None else task_ids[i:i + 1])[0]
                for i, chunk in enumerate(chunks)]
        return torch.cat(outs).to(patches.dtype)
