"""Connector configurations: plain dataclasses with HF-style ``save_pretrained`` / ``from_pretrained``."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from cmoe.checkpointing import moved_aside
from cmoe.errors import CMoEError, expect
from cmoe.io import write_json
from cmoe.validation import check_field_types

CONFIG_NAME = "config.json"
C = TypeVar("C", bound="ConnectorConfig")


def _positive_int(value: object, name: str) -> None:
    expect(isinstance(value, int) and not isinstance(value, bool) and value >= 1, name, "an int >= 1", repr(value))


@dataclass
class ConnectorConfig:
    """Fields shared by every connector, and JSON round-tripping."""

    connector_type: ClassVar[str] = "connector"

    def to_dict(self) -> dict[str, Any]:
        return {"connector_type": self.connector_type, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any]) -> C:
        data = dict(data)
        kind = data.pop("connector_type", cls.connector_type)
        expect(kind == cls.connector_type, "connector_type", repr(cls.connector_type), repr(kind))
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise CMoEError(f"{cls.__name__}: unknown field(s) {unknown}; known fields: {sorted(known)}")
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in data
                   and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if missing:
            raise CMoEError(f"{cls.__name__}: missing required field(s) {missing}; add them to the config")
        return cls(**data)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write ``config.json`` into `directory` (created if needed), atomically."""
        return write_json(Path(directory) / CONFIG_NAME, self.to_dict())

    @classmethod
    def from_pretrained(cls: type[C], directory: str | os.PathLike) -> C:
        return cls.from_dict(read_config_json(directory))


def read_config_json(directory: str | os.PathLike) -> dict[str, Any]:
    """The mapping in `directory`'s ``config.json``; a missing, empty, non-JSON or non-mapping file raises
    `CMoEError` naming it. Reads only: a directory moved aside by an interrupted save is named, not moved back."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise CMoEError(moved_aside(directory) or f"{path}: no {CONFIG_NAME} here; pass a directory written by "
                        "save_pretrained")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise CMoEError(f"{path}: not valid JSON ({error}); save the connector again or restore the file") from None
    expect(isinstance(data, dict), str(path), "a JSON object of config fields (save the connector again)",
           type(data).__name__)
    return data


@dataclass
class CMoEConfig(ConnectorConfig):
    """Everything that defines a `CMoEConnector`.

    ``in_features`` is the vision encoder's width; with ``aggregate_tokens = n`` the router and the experts see
    tokens of width ``n · in_features``. ``top_k=None`` means the router's own default (2 for ``token_topk``,
    dense for the others). ``router_input`` / ``router_rule`` override a router preset's input
    (``token``/``task``/``task_token``) and rule (``softmax``/``sigmoid``). ``router_options`` is passed to the
    router's constructor as extra keyword arguments (for plugin routers). ``check_finite`` raises on NaN/inf
    router logits (and warns near fp16's range) in eager mode; it reads one value back per call (a host sync),
    so pass False for a sync-free eager step (CUDA graphs); ``torch.compile`` skips it either way.
    """

    connector_type: ClassVar[str] = "cmoe"

    in_features: int
    out_features: int
    num_experts: int = 4
    top_k: int | None = None
    router: str = "token_topk"
    router_input: str | None = None
    router_rule: str | None = None
    router_gate: str = "linear"
    router_hidden: int | None = None
    router_noise_std: float = 0.0
    renormalize: bool = True
    router_options: dict[str, Any] = field(default_factory=dict)
    expert: str = "mlp"
    expert_hidden: int | None = None
    expert_bias: bool = True
    expert_activation: str = "gelu"
    aggregate_tokens: int = 1
    num_tasks: int = 0
    task_embed_dim: int | None = None
    load_balance_coef: float = 0.0
    z_loss_coef: float = 0.0
    backend: str = "auto"
    check_finite: bool = True

    def __post_init__(self) -> None:
        for name in ("in_features", "out_features", "num_experts", "aggregate_tokens"):
            _positive_int(getattr(self, name), name)
        if self.top_k is not None:
            expect(isinstance(self.top_k, int) and not isinstance(self.top_k, bool)
                   and 1 <= self.top_k <= self.num_experts, "top_k",
                   f"None or an int in 1..num_experts={self.num_experts}", repr(self.top_k))
        expect(isinstance(self.num_tasks, int) and self.num_tasks >= 0, "num_tasks", "an int >= 0", self.num_tasks)
        for name in ("expert_hidden", "router_hidden", "task_embed_dim"):
            if getattr(self, name) is not None:
                _positive_int(getattr(self, name), name)
        for name in ("load_balance_coef", "z_loss_coef", "router_noise_std"):
            expect(isinstance(getattr(self, name), (int, float)) and getattr(self, name) >= 0, name,
                   "a number >= 0", repr(getattr(self, name)))
        expect(isinstance(self.router_options, dict), "router_options", "a dict of keyword arguments",
               type(self.router_options).__name__)
        check_field_types(self)

    @property
    def token_features(self) -> int:
        """Width of one token after aggregation: what the router and the experts see."""
        return self.in_features * self.aggregate_tokens


@dataclass
class MLPConnectorConfig(ConnectorConfig):
    """The plain LLaVA / MiniGPT-v2 projector: (aggregate) → Linear → GELU → Linear; the ablation baseline."""

    connector_type: ClassVar[str] = "mlp"

    in_features: int
    out_features: int
    hidden_features: int | None = None
    aggregate_tokens: int = 1
    activation: str = "gelu"
    bias: bool = True

    def __post_init__(self) -> None:
        for name in ("in_features", "out_features", "aggregate_tokens"):
            _positive_int(getattr(self, name), name)
        if self.hidden_features is not None:
            _positive_int(self.hidden_features, "hidden_features")
        check_field_types(self)

    @property
    def token_features(self) -> int:
        return self.in_features * self.aggregate_tokens
