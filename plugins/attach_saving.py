"""Reload a HF model saved with a cmoe connector attached: base weights, connector and attach options.

`cmoe.attach` writes its record (attacher, connector config, model config fields it changed) into
``model.config.cmoe_attach``, and the model's own ``save_pretrained`` writes every tensor, the connector's
included. `load_saved_attached` runs ``from_pretrained`` of the attached class (the class `attach` gives the model,
`cmoe.plugins.attached_model`), whose constructor attaches a connector built from the record, so transformers loads
every tensor by name (sharding, dtype, device maps and tied weights as usual) and any tensor left over or missing
raises instead of being re-initialised.
"""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from cmoe.config import ConnectorConfig
from cmoe.connector import CONNECTORS
from cmoe.errors import CMoEError
from cmoe.extras import require


def connector_config(record: dict[str, Any]) -> ConnectorConfig:
    """The connector config of an attach record."""
    data = dict(record.get("connector") or {})
    kind = data.get("connector_type")
    if kind not in CONNECTORS:
        raise CMoEError(f"cmoe_attach.connector.connector_type: expected one of {sorted(CONNECTORS)}, got {kind!r}; "
                        "save the model again with this cmoe")
    return CONNECTORS[kind].config_class.from_dict(data)


def _base_class(config: Any, model_class: type | None) -> type:
    if model_class is not None:
        expected = getattr(model_class, "config_class", None)
        if isinstance(expected, type) and not isinstance(config, expected):
            raise CMoEError(f"model_class: expected a class for the saved {type(config).__name__} (config.json "
                            f"names {getattr(config, 'architectures', None)}), got {model_class.__name__}, which "
                            f"takes a {expected.__name__}; leave model_class out or pass the class that saved it")
        return model_class
    import transformers

    names = getattr(config, "architectures", None) or []
    found = next((getattr(transformers, name, None) for name in names if hasattr(transformers, name)), None)
    if found is None:
        raise CMoEError(f"config.json architectures: expected a transformers model class, got {names}; pass "
                        "model_class=... (the class the model was built with)")
    return found


def load_saved_attached(path: str | os.PathLike, record: dict[str, Any], model_class: type | None,
                        options: dict[str, Any]) -> nn.Module:
    """See the module docstring; `options` go to ``from_pretrained``."""
    require("hf", "cmoe.load_attached")
    from transformers import AutoConfig

    from cmoe.attach import RECORD_FIELD
    from cmoe.plugins.attached_model import attached_class

    config = options.pop("config", None) or AutoConfig.from_pretrained(path)
    setattr(config, RECORD_FIELD, record)
    connector_config(record)  # a bad record fails here, before any weight is read
    base = _base_class(config, model_class)
    mismatch = (f"{path}: the saved tensors do not match a {base.__name__} with the recorded connector "
                "({}); the folder was saved from another base model or with another connector: load it with the "
                "model class and connector that saved it")
    try:
        model, info = attached_class(base).from_pretrained(path, config=config, output_loading_info=True, **options)
    except RuntimeError as error:
        if "mismatch" not in str(error):
            raise
        raise CMoEError(mismatch.format("tensor shapes differ, see the load report above")) from None
    problems = {kind: sorted(info.get(kind) or ()) for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if any(problems.values()):
        shown = "; ".join(f"{kind.replace('_', ' ')}: {keys[:4]}{' ...' if len(keys) > 4 else ''}"
                          for kind, keys in problems.items() if keys)
        raise CMoEError(mismatch.format(shown))
    return model
