"""An attached model: the model's own class, whose calls take task ids. The whole mechanism is in this module.

`FamilyAttacher.attach` puts an `AttachedProjection` where the family's projection was and swaps the model's
class for ``attached_class(type(model))``: a subclass made once per class (as `torch.nn.utils.parametrize` does for
a parametrized module), named like it, so ``isinstance``, ``save_pretrained``'s ``architectures`` and HF's Trainer
see the class they know. `detach` puts the class back. The subclass changes three entry points; besides, built from
a config that records an attachment it attaches the connector (how `cmoe.load_attached` loads a saved one through
its ``from_pretrained``), and it pickles as itself:

- ``forward`` has the class's own parameters plus keyword-only ``task_ids`` and ``cmoe_task_ids``: a real function
  built from the class's signature, as `dataclasses` builds ``__init__``, so Python's argument binding,
  ``inspect.signature`` and HF's Trainer (which keeps only the batch columns ``forward`` names) agree;
- ``__call__`` takes the same two keywords, so ``model(...)`` gets them also where a wrapper replaced
  ``model.forward`` on the instance (TRL's fused loss calls the inner model directly);
- ``generate`` takes them too (or those of `cmoe.using_task_ids`) and routes every step by them.

How a call gets its ids: each of the three opens a `Call` for its duration, held in a context variable (per thread,
never on the model). `Call.open` works out one task id per image from the call's own inputs
(`cmoe.plugins.attach_inputs`); the `AttachedProjection` asks the running call of its model for the ids of the rows
it sees and leaves its output there; `Call.close` adds the connector's aux loss to ``output.loss`` and exposes
``output.cmoe_aux_loss`` and ``output.cmoe_routing``. A call made without ids while a call of the same model runs is
part of it (``model(...)`` runs the class's ``forward``; a replaced ``forward`` calls the original), so each call is
handled once. ``forward`` calls inside a ``generate`` are calls of their own, with generate's ids.

Under HF's Trainer with gradient accumulation the language-model loss of a micro-batch is divided by the tokens
of the whole accumulated batch (``num_items_in_batch``); the aux loss is weighted by the micro-batch's share of
those tokens, so over the accumulated batch it counts once, at any accumulation.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from cmoe.connector import ConnectorOutput, PretrainedConnector
from cmoe.errors import CMoEError, expect
from cmoe.plugins.attach_inputs import (NO_TASK_IDS, TASK_ID_KEYWORDS, anyres_crops, aux_weight, check_not_mixed,
                                        given_task_ids, images_in_call, per_image_task_ids, spread_over_rows)

ATTACHMENT = "_cmoe_attachment"
"""Where an attached model keeps its `Attachment` (``model.__dict__``): a deep copy of the model (EMA, a reference
model) gets its own, and its projection the same copy."""


@dataclass
class Attachment:
    """What `attach` did to one model, to undo it, and what lasts across its calls: the ids of
    `cmoe.using_task_ids` and the aux losses of training calls since HF's Trainer last logged them."""

    family: str
    rows: str = "auto"
    projection: str = ""
    restore: list[tuple[nn.Module, str, nn.Module]] = field(default_factory=list)
    config_fields: dict[str, Any] = field(default_factory=dict)
    sticky_task_ids: torch.Tensor | None = None
    logged_aux: torch.Tensor | None = None
    logged_calls: int = 0

    def log_aux(self, aux: torch.Tensor) -> None:
        logged = aux.detach().float()
        self.logged_aux = logged if self.logged_aux is None else self.logged_aux + logged
        self.logged_calls += 1

    def take_logged_aux(self) -> float | None:
        """The mean aux loss of the training calls since the last take (None if there were none), then reset."""
        if not self.logged_calls:
            return None
        value = float(self.logged_aux) / self.logged_calls
        self.logged_aux, self.logged_calls = None, 0
        return value


@dataclass
class Call:
    """One running ``forward`` / ``__call__`` (routes, collects the connector's outputs, adds the aux loss when it
    ends) or ``generate`` (hands its ids to the forward calls it makes, routes images it projects outside them)."""

    attachment: Attachment
    generating: bool
    task_ids: torch.Tensor | None
    image_task_ids: torch.Tensor | None
    image_rows: torch.Tensor | None
    image_weights: torch.Tensor | None
    aux_weight: torch.Tensor | None
    projected: int = 0
    outputs: list[ConnectorOutput] = field(default_factory=list)

    @classmethod
    def open(cls, model: nn.Module, inputs: dict[str, Any], ids: torch.Tensor | None,
             generating: bool = False) -> Call:
        """The call of `model` on `inputs` routed by `ids` (per example or per image), worked out per image."""
        attachment: Attachment = model.__dict__[ATTACHMENT]
        if ids is not None:
            check_not_mixed(inputs)
        config = getattr(model, "config", None)
        images, weights = images_in_call(inputs)
        crops = None
        if attachment.rows == "anyres" and inputs.get("pixel_values") is not None:
            crops = anyres_crops(config, inputs.get("image_sizes"))
        per_image = None if ids is None else per_image_task_ids(ids, inputs, config, images, weights)
        return cls(attachment, generating, ids, per_image, crops, weights, aux_weight(inputs))

    @contextmanager
    def running(self) -> Iterator[Call]:
        token = _CALLS.set(_CALLS.get() + (self,))
        try:
            yield self
        finally:
            _CALLS.reset(token)

    def row_task_ids(self, rows: int, device: torch.device) -> torch.Tensor | None:
        """This call's per-image ids spread over the `rows` one projection call sees."""
        ids = self.image_task_ids
        if ids is None:
            return None
        ids = ids.to(device)
        if self.attachment.rows == "per_call":
            image, self.projected = self.projected, self.projected + 1
            expect(image < ids.shape[0], "task_ids", f"one task id per image (the connector ran for image {image + 1})",
                   f"{ids.shape[0]} task ids")
            return ids[image].expand(rows)
        return spread_over_rows(ids, rows, self.image_rows, self.image_weights, self.attachment.family)

    def close(self, model: nn.Module, output: Any) -> Any:
        """Check the per-image count and add the connector's aux loss (and routing) to the output."""
        ids = self.image_task_ids
        if self.attachment.rows == "per_call" and ids is not None and self.projected:
            expect(self.projected == ids.shape[0], "task_ids", f"one task id per image, shape [{self.projected}]",
                   f"shape {list(ids.shape)}")
        if not self.outputs or not hasattr(output, "keys"):
            return output
        aux = sum(o.aux_loss for o in self.outputs) / len(self.outputs)
        output["cmoe_aux_loss"] = aux
        output["cmoe_routing"] = [o.routing for o in self.outputs]
        if model.training:
            self.attachment.log_aux(aux)
        if getattr(output, "loss", None) is not None:
            weighted = aux if self.aux_weight is None else aux * self.aux_weight.to(aux.dtype)
            output["loss"] = output.loss + weighted.to(output.loss.dtype)
        return output


_CALLS: ContextVar[tuple[Call, ...]] = ContextVar("cmoe_attached_calls", default=())


def running_call(attachment: Attachment) -> Call | None:
    """The innermost running call of the model `attachment` belongs to, in this thread."""
    return next((call for call in reversed(_CALLS.get()) if call.attachment is attachment), None)


def _sticky_row_task_ids(attachment: Attachment, rows: int, device: torch.device) -> torch.Tensor | None:
    """Outside any call of the model (a submodule called directly): the ids of `cmoe.using_task_ids`, per image."""
    ids = attachment.sticky_task_ids
    if ids is None:
        return None
    ids = ids.to(device)
    if attachment.rows == "per_call" and ids.shape[0] > 1:
        raise CMoEError(f"task_ids: the {attachment.family} connector runs once per image and was called outside a "
                        "call of the model, so which image it projects is unknown; call the model (or generate)")
    return spread_over_rows(ids[:1] if attachment.rows == "per_call" else ids, rows, None, None, attachment.family)


class AttachedProjection(nn.Module):
    """A CMoE in the place of a family's final projection: ``[..., in] → [..., out]`` (or, with token
    aggregation, ``[rows, N, in] → [rows, N / n, out]``), returning a tensor as the projection did."""

    def __init__(self, connector: PretrainedConnector, attachment: Attachment):
        super().__init__()
        self.connector = connector
        self.__dict__["attachment"] = attachment

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        width = x.shape[-1]
        per_row = x.dim() >= 3 and self.attachment.rows != "tokens"
        rows = x.reshape(-1, x.shape[-2], width) if per_row else x.reshape(-1, 1, width)
        call = running_call(self.attachment)
        if call is not None:
            task_ids = call.row_task_ids(rows.shape[0], x.device)
        else:
            task_ids = _sticky_row_task_ids(self.attachment, rows.shape[0], x.device)
        try:
            out = self.connector(rows.to(next(self.connector.parameters()).dtype), task_ids)
        except CMoEError as error:
            if task_ids is None and str(error).startswith("task_ids:"):
                raise CMoEError(NO_TASK_IDS) from error
            raise
        if call is not None:
            call.outputs.append(out)
        hidden = out.hidden_states.to(x.dtype)
        if per_row:
            return hidden.reshape(*x.shape[:-2], hidden.shape[-2], hidden.shape[-1])
        return hidden.reshape(*x.shape[:-1], hidden.shape[-1])


def _attachment_or_none(model: nn.Module, ids: torch.Tensor | None) -> Attachment | None:
    """The model's attachment; None for a model detached since, whose built ``forward`` a wrapper kept on the
    instance (accelerate's mixed-precision wrapper does): that call runs the class's own method."""
    attachment = model.__dict__.get(ATTACHMENT)
    if attachment is None and ids is not None:
        raise CMoEError("task_ids: the model's cmoe connector was detached (cmoe.detach), so nothing routes by task "
                        "ids; drop task_ids, or cmoe.attach the model again")
    return attachment


def _run_forward(model: nn.Module, invoke: Callable[[], Any], inputs: dict[str, Any],
                 ids: torch.Tensor | None) -> Any:
    """One ``forward`` / ``__call__`` of an attached model, between `Call.open` and `Call.close`."""
    attachment = _attachment_or_none(model, ids)
    if attachment is None:
        return invoke()
    enclosing = running_call(attachment)
    if ids is None and enclosing is not None and not enclosing.generating:
        return invoke()  # part of the running call
    if ids is None:
        ids = enclosing.task_ids if enclosing is not None else attachment.sticky_task_ids
    call = Call.open(model, inputs, ids)
    with call.running():
        output = invoke()
    return call.close(model, output)


def _run_generate(model: nn.Module, invoke: Callable[[], Any], inputs: dict[str, Any],
                  ids: torch.Tensor | None) -> Any:
    """One ``generate``: HF's generate may project the images before its first forward, outside any forward, so the
    ids per image are worked out from generate's own inputs; each forward it makes gets the ids as given."""
    attachment = _attachment_or_none(model, ids)
    if attachment is None:
        return invoke()
    ids = ids if ids is not None else attachment.sticky_task_ids
    if ids is None:
        return invoke()
    if "input_ids" not in inputs and isinstance(inputs.get("inputs"), torch.Tensor):
        inputs = {**inputs, "input_ids": inputs["inputs"]}
    with Call.open(model, inputs, ids, generating=True).running():
        return invoke()


_NOT_GIVEN = object()


class _Default:
    """Renders as the expression that reads a parameter's default, in the source `_with_task_id_keywords` builds."""

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return f"_defaults[{self.name!r}]"


def _with_task_id_keywords(method: Callable, run: Callable) -> Callable:
    """A function with `method`'s parameters plus keyword-only ``task_ids`` and ``cmoe_task_ids``, built from source
    as `dataclasses` builds ``__init__``. It calls ``run(self, invoke, inputs, ids)``: ``invoke()`` calls `method`
    with the arguments as the caller gave them (a parameter left at its default is left out), ``inputs`` names
    every argument, ``ids`` are the task ids given under either keyword."""
    kinds = inspect.Parameter
    signature = inspect.signature(method)
    parameters = list(signature.parameters.values())
    clash = [p.name for p in parameters if p.name in TASK_ID_KEYWORDS]
    if clash:
        raise CMoEError(f"model: expected a {method.__qualname__} without parameters named {clash}, which cmoe.attach "
                        "adds for task ids; attach a model whose forward does not take them")
    var_positional = next((p.name for p in parameters if p.kind is kinds.VAR_POSITIONAL), None)
    var_keyword = next((p.name for p in parameters if p.kind is kinds.VAR_KEYWORD), None)
    positional_names = tuple(p.name for p in parameters[1:] if p.kind is kinds.POSITIONAL_ONLY
                             or (p.kind is kinds.POSITIONAL_OR_KEYWORD and var_positional))
    named = [p.name for p in parameters[1:] if p.name not in positional_names
             and p.kind not in (kinds.VAR_POSITIONAL, kinds.VAR_KEYWORD)]
    defaults = {p.name: p.default for p in parameters if p.default is not kinds.empty}
    plain = [p.replace(annotation=kinds.empty, default=kinds.empty if p.default is kinds.empty else _Default(p.name))
             for p in parameters]
    at = len(plain) - (var_keyword is not None)
    task_parameters = [kinds(name, kinds.KEYWORD_ONLY, default=None) for name in TASK_ID_KEYWORDS]
    rendered = signature.replace(parameters=plain[:at] + task_parameters + plain[at:], return_annotation=kinds.empty)
    this = parameters[0].name

    def call(self: nn.Module, args: tuple, arguments: dict[str, Any], keywords: dict[str, Any],
             task_ids: Any, cmoe_task_ids: Any) -> Any:
        passed = {k: v for k, v in arguments.items() if v is not defaults.get(k, _NOT_GIVEN)}
        inputs = {**dict(zip(positional_names, args)), **arguments, **keywords}
        return run(self, lambda: method(self, *args, **passed, **keywords), inputs,
                   given_task_ids(task_ids, cmoe_task_ids))

    args = "".join(f"{name}, " for name in positional_names) + (f"*{var_positional}, " if var_positional else "")
    arguments = ", ".join(f"{name!r}: {name}" for name in named)
    source = (f"def {method.__name__}{rendered}:\n"
              f"    return _call({this}, ({args}), {{{arguments}}}, {var_keyword or '{}'}, task_ids, cmoe_task_ids)\n")
    namespace: dict[str, Any] = {"__name__": __name__, "_call": call, "_defaults": defaults}
    exec(source, namespace)  # the source names only the method's own parameters and the two keywords
    built = namespace[method.__name__]
    built.__doc__ = method.__doc__
    built.__qualname__ = method.__qualname__
    return built


class AttachedModel:
    """What every attached class adds to the model's own class (see the module docstring); ``attached_class``
    adds ``forward`` and ``generate`` built from the class's signatures."""

    _cmoe_base: type
    _cmoe_positional: tuple[str, ...] = ()

    def __init__(self, config: Any, *args: Any, **kwargs: Any) -> None:
        """Build the model with the connector ``config.cmoe_attach`` records attached, as `cmoe.load_attached` does
        through the class's ``from_pretrained``, so every saved tensor (connector included) loads by name."""
        from cmoe.attach import RECORD_FIELD, attach
        from cmoe.plugins.attach_saving import connector_config

        record = getattr(config, RECORD_FIELD, None)
        if not isinstance(record, dict):
            raise CMoEError(f"config: expected one saved from an attached model (with a {RECORD_FIELD!r} entry) to "
                            f"build an attached {type(self).__name__}, got one without; build the model's own class "
                            "and call cmoe.attach(model)")
        delattr(config, RECORD_FIELD)
        for name, value in (record.get("config_fields") or {}).items():
            setattr(config, name, value)
        super().__init__(config, *args, **kwargs)
        attach(self, connector_config(record), attacher=record["attacher"], init="random")

    def __call__(self, *args: Any, task_ids: Any = None, cmoe_task_ids: Any = None, **kwargs: Any) -> Any:
        call = super().__call__
        inputs = {**dict(zip(self._cmoe_positional, args)), **kwargs}
        return _run_forward(self, lambda: call(*args, **kwargs), inputs, given_task_ids(task_ids, cmoe_task_ids))

    def __reduce_ex__(self, protocol: Any) -> Any:
        """Pickled and deep-copied as the attached class of its base class (which pickle finds by name)."""
        return (_new_attached, (self._cmoe_base,), *super().__reduce_ex__(protocol)[2:])


def _new_attached(base: type) -> nn.Module:
    cls = attached_class(base)
    return cls.__new__(cls)


@functools.cache
def attached_class(base: type) -> type:
    """The attached class of `base`: its subclass whose ``forward``, ``__call__`` and ``generate`` take task ids."""
    if issubclass(base, AttachedModel):
        return base
    forward = _with_task_id_keywords(base.forward, _run_forward)
    namespace: dict[str, Any] = {
        "__module__": base.__module__, "__qualname__": base.__qualname__, "__doc__": base.__doc__,
        "_cmoe_base": base, "forward": forward,
        "_cmoe_positional": tuple(p.name for p in list(inspect.signature(forward).parameters.values())[1:]
                                  if p.kind in (inspect.Parameter.POSITIONAL_ONLY,
                                                inspect.Parameter.POSITIONAL_OR_KEYWORD)),
    }
    if callable(getattr(base, "generate", None)):
        namespace["generate"] = _with_task_id_keywords(base.generate, _run_generate)
    return type(base.__name__, (AttachedModel, base), namespace)


def make_attached(model: nn.Module, attachment: Attachment) -> None:
    """Give `model` its attached class and `attachment`."""
    model.__class__ = attached_class(type(model))
    model.__dict__[ATTACHMENT] = attachment


def make_detached(model: nn.Module) -> Attachment:
    """Give `model` its own class back; returns its `Attachment`."""
    cls = type(model)
    if "_cmoe_base" not in cls.__dict__:
        raise CMoEError(f"model: its class was changed after cmoe.attach (now {cls.__qualname__}, a subclass of the "
                        "attached class), so detach cannot restore it; detach before wrapping the model's class")
    model.__class__ = cls._cmoe_base
    return model.__dict__.pop(ATTACHMENT)


def attachments(model: nn.Module) -> list[Attachment]:
    """The attachments of `model` and of the attached models inside it (a peft or DDP wrapper)."""
    return [module.__dict__[ATTACHMENT] for module in model.modules() if ATTACHMENT in module.__dict__]
