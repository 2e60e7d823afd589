"""Put a CMoE connector into an existing multimodal model, in place, and take it out again.

Which module is "the connector" differs per model family; attachers registered by plugins
(`cmoe_register_attachers`) know each family. ``attach`` asks every registered attacher whether it
``matches`` the model (attachers marked ``fallback = True`` last) and lets the first that does replace the
connector. Task ids are given per example or per image (see `cmoe.plugins.attached_model`).

Saving: `attach` records what it did (the attacher, the connector's config) in ``model.config.cmoe_attach``, so
a folder written by the model's own ``save_pretrained`` (or HF Trainer's ``save_model``) holds everything needed;
`load_attached` rebuilds the model with its connector from such a folder.

Upcycling (sparse upcycling, as MoE-LLaVA initialises its experts from the dense FFN): an attacher that
exposes ``upcycle_source(model)`` lets `attach` copy the projection it replaces into every expert, so the
model starts exactly where it was (routing weights sum to one, so identical experts give the original output).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from cmoe.config import CMoEConfig, ConnectorConfig, read_config_json
from cmoe.connector import PretrainedConnector, build_connector
from cmoe.errors import CMoEError, expect
from cmoe.experts import StackedExperts
from cmoe.registry import ATTACHERS

STATE_ATTRIBUTE = "_cmoe_attached"
RECORD_FIELD = "cmoe_attach"
RECORD_FORMAT = 1
INITS = ("auto", "upcycle", "random")
Layers = list[tuple[torch.Tensor, "torch.Tensor | None"]]


class Attacher(Protocol):
    """What an attacher plugin provides for one MLLM family. Optional: ``upcycle_source(model)`` returning
    ``([(weight [out, in], bias or None), ...], activation name or None)`` of the projection it replaces (for
    ``init="upcycle"``), ``fallback = True`` for attachers asked only after all the others, ``attach_record(model)``
    returning extra JSON fields for the saved record, and ``from_pretrained(path, record, **options)`` rebuilding a
    saved attached model (for `load_attached`)."""

    def matches(self, model: nn.Module) -> bool: ...

    def default_config(self, model: nn.Module, **overrides: Any) -> CMoEConfig: ...

    def attach(self, model: nn.Module, connector: PretrainedConnector) -> None: ...

    def detach(self, model: nn.Module) -> PretrainedConnector: ...

    def set_task_ids(self, model: nn.Module, task_ids: torch.Tensor | None) -> None: ...


def find_attacher(model: nn.Module, name: str | None = None) -> tuple[str, Attacher]:
    """The attacher named `name`, or the first registered one that matches `model`."""
    if name is not None:
        return name, ATTACHERS.get(name)
    names = sorted(ATTACHERS.names(), key=lambda n: bool(getattr(ATTACHERS.get(n), "fallback", False)))
    for candidate in names:
        attacher = ATTACHERS.get(candidate)
        if attacher.matches(model):
            return candidate, attacher
    raise CMoEError(f"model: expected a multimodal model a registered attacher knows "
                    f"(attachers: {', '.join(ATTACHERS.names()) or 'none'}), got {type(model).__name__}; "
                    "add the family to cmoe.plugins.attach_families.FAMILIES or register an attacher plugin")


def upcycle_fits(connector: PretrainedConnector, layers: Layers, activation: str | None) -> bool:
    """Whether `connector`'s experts have exactly the shapes (and activation) of the projection `layers`."""
    experts = getattr(connector, "experts", None)
    if not isinstance(experts, StackedExperts) or len(experts.layers) != len(layers):
        return False
    if len(layers) > 1 and experts.activation_name != activation:
        return False
    return all(w.shape[1:] == src.shape and (b is not None or src_b is None)
               for (w, b), (src, src_b) in zip(experts.layers, layers))


def upcycle(connector: PretrainedConnector, layers: Layers, noise: float = 0.0) -> None:
    """Copy the projection `layers` (``[(weight [out, in], bias or None), ...]``) into every expert; with
    ``noise > 0`` add Gaussian noise of that many times each weight's standard deviation to break symmetry."""
    with torch.no_grad():
        for (weight, bias), (src, src_bias) in zip(connector.experts.layers, layers):
            weight.copy_(src.to(weight).expand_as(weight))
            if noise:
                weight.add_(torch.randn_like(weight) * noise * src.float().std().to(weight.dtype))
            if bias is not None:
                bias.copy_(src_bias.to(bias).expand_as(bias) if src_bias is not None else torch.zeros_like(bias))


def attach(
    model: nn.Module,
    connector: PretrainedConnector | ConnectorConfig | None = None,
    *,
    attacher: str | None = None,
    init: str = "auto",
    init_noise: float = 0.0,
    **config_overrides: Any,
) -> PretrainedConnector:
    """Replace `model`'s connector in place with a CMoE (or any cmoe connector) and return the connector.

    `connector` is a built connector, a config to build one from, or None to build a `CMoEConfig` with the
    widths read off the model and `config_overrides` (e.g. ``num_experts=4, top_k=2``). After attaching,
    ``model(..., task_ids=...)`` routes by task, ``output.loss`` includes the connector's aux loss, and
    ``output.cmoe_aux_loss`` / ``output.cmoe_routing`` expose it; `detach` restores the original.

    `init`: ``"upcycle"`` copies the replaced projection into every expert (``init_noise`` adds noise of that
    many weight standard deviations); ``"random"`` keeps the experts' fresh initialisation (to train a
    connector from scratch, e.g. for ablations or a different expert shape); ``"auto"`` (default) upcycles a
    connector built here when its shapes allow and leaves a given connector's weights as they are.

    The connector is moved to the replaced projection's device and dtype (in a bf16 model it is bf16).
    """
    if getattr(model, STATE_ATTRIBUTE, None) is not None:
        raise CMoEError("model: already has a cmoe connector attached; call cmoe.detach(model) first")
    _check_no_dropped_connector(model)
    expect(init in INITS, "init", f"one of {INITS}", repr(init))
    expect(isinstance(init_noise, (int, float)) and init_noise >= 0, "init_noise", "a number >= 0", repr(init_noise))
    name, found = find_attacher(model, attacher)
    built_here = not isinstance(connector, PretrainedConnector)
    if connector is None:
        connector = build_connector(found.default_config(model, **config_overrides))
    elif config_overrides:
        raise CMoEError(f"config_overrides {sorted(config_overrides)}: only allowed when no connector or config "
                        "is given")
    elif isinstance(connector, ConnectorConfig):
        connector = build_connector(connector)
    if not isinstance(connector, PretrainedConnector):
        raise CMoEError(f"connector: expected a cmoe connector or config, got {type(connector).__name__}")
    source = found.upcycle_source(model) if hasattr(found, "upcycle_source") else None
    if init == "upcycle" or (init == "auto" and built_here):
        fits = source is not None and upcycle_fits(connector, *source)
        if init == "upcycle" and not fits:
            raise CMoEError("init: expected a connector whose experts have the replaced projection's shapes "
                            "(the attacher's default expert type, hidden width and activation, aggregate_tokens=1), "
                            "got one that does not fit; drop the overrides that change them or pass init='random'")
        if fits:
            upcycle(connector, source[0], init_noise)
    # The connector follows the model: the replaced projection's device and dtype (bf16 model: bf16 connector).
    layers = source[0] if source else []
    floating = (p for p in model.parameters() if p.is_floating_point())
    reference = layers[0][0] if layers else next(floating, None)
    if reference is not None:
        connector.to(device=reference.device, dtype=reference.dtype)
    found.attach(model, connector)
    setattr(model, STATE_ATTRIBUTE, name)
    model_config = getattr(model, "config", None)
    if model_config is not None:
        extra = found.attach_record(model) if hasattr(found, "attach_record") else {}
        setattr(model_config, RECORD_FIELD, {"format": RECORD_FORMAT, "attacher": name,
                                             "connector": connector.config.to_dict(), **extra})
    return connector


def _check_no_dropped_connector(model: nn.Module) -> None:
    """A model whose config records a connector that is not attached was loaded from an attached model's folder
    by a plain ``from_pretrained``, which re-initialised the projection and dropped the trained connector."""
    if isinstance(getattr(getattr(model, "config", None), RECORD_FIELD, None), dict):
        raise CMoEError("model: its config records a cmoe connector (the folder was saved from an attached model) but "
                        "none is attached: a plain from_pretrained dropped the saved connector and re-initialised the "
                        "projection; load the folder with cmoe.load_attached(path) instead")


def attached_model(model: nn.Module) -> nn.Module:
    """`model` if a connector is attached to it, else the module inside it that has one (a peft or DDP wrapper
    holds the attached model as a submodule)."""
    for module in model.modules():
        if STATE_ATTRIBUTE in module.__dict__:
            return module
    _check_no_dropped_connector(model)
    raise CMoEError(f"model: expected a model with a cmoe connector attached (cmoe.attach), or a wrapper of one "
                    f"(peft, DDP), got {type(model).__name__} without one; call cmoe.attach(model) first")


def detach(model: nn.Module) -> PretrainedConnector:
    """Restore the model's original connector; returns the cmoe connector that was attached. `model` may be a
    wrapper of the attached model (peft, DDP)."""
    model = attached_model(model)
    connector = ATTACHERS.get(model.__dict__[STATE_ATTRIBUTE]).detach(model)
    delattr(model, STATE_ATTRIBUTE)
    model_config = getattr(model, "config", None)
    if model_config is not None and hasattr(model_config, RECORD_FIELD):
        delattr(model_config, RECORD_FIELD)
    return connector


@contextmanager
def using_task_ids(model: nn.Module, task_ids: torch.Tensor | list[int]) -> Iterator[None]:
    """Route by these task ids (one per example or per image) for every call inside the block — e.g. around
    ``generate``, which does not pass unknown keyword arguments on to ``forward``. `model` may be a wrapper of
    the attached model (peft, DDP)."""
    model = attached_model(model)
    found = ATTACHERS.get(model.__dict__[STATE_ATTRIBUTE])
    found.set_task_ids(model, torch.as_tensor(task_ids))
    try:
        yield
    finally:
        found.set_task_ids(model, None)


def read_attach_record(path: str | os.PathLike) -> dict[str, Any]:
    """The attach record in the ``config.json`` of a folder saved from an attached model."""
    folder = Path(path)
    if not (folder / "config.json").is_file() and (folder / "adapter_config.json").is_file():
        raise CMoEError(f"{folder}: a peft adapter folder, not a whole model; load the base model, cmoe.attach it "
                        "as before training and use peft.PeftModel.from_pretrained(model, folder), or save the "
                        "whole model with model.merge_and_unload().save_pretrained(dir) and load that")
    record = read_config_json(folder).get(RECORD_FIELD)
    if not isinstance(record, dict):
        raise CMoEError(f"{folder}: expected a model saved with a cmoe connector attached (config.json with a "
                        f"{RECORD_FIELD!r} entry), got one without; load it with from_pretrained and call "
                        "cmoe.attach(model) to add a connector")
    expect(record.get("format") == RECORD_FORMAT, f"{folder / 'config.json'} {RECORD_FIELD}.format",
           f"{RECORD_FORMAT} (written by this cmoe)", f"{record.get('format')!r}; upgrade cmoe")
    return record


def load_attached(path: str | os.PathLike, **options: Any) -> nn.Module:
    """The attached model saved in `path` by its own ``save_pretrained`` (or HF Trainer's ``save_model``): base
    weights and connector, attached as before, so ``model(..., task_ids=...)``, `using_task_ids` and a further
    ``save_pretrained`` work as they did. `options` go to the base class's ``from_pretrained`` (``dtype``,
    ``device_map``, ...; ``model_class`` picks the class instead of the one ``config.json`` names)."""
    record = read_attach_record(path)
    found = ATTACHERS.get(record["attacher"])
    if not hasattr(found, "from_pretrained"):
        raise CMoEError(f"attacher {record['attacher']!r}: cannot rebuild a saved model (no from_pretrained); "
                        "rebuild the base model, cmoe.attach it and load the saved state dict")
    return found.from_pretrained(path, record, **options)
