"""Convert a checkpoint of the original Uni-Med code into a `CMoEConnector` and a recipe checkpoint.

The original saves ``checkpoint_<epoch>.pth`` = ``{"model", "optimizer", "config", "scaler", "epoch"}``, where
``model`` holds the parameters that train (and the buffers the base model saves):

* ``task_tokens.<task>`` ``[1, 1, C]`` for each of ``vqa, refer, identify, caption, cls``;
* ``moe_layers.<e>.0.{weight,bias}`` (and ``.2.*`` for MLP experts), repeated as ``llm_proj.<e>.*`` (the
  same modules under a second name);
* ``router.fc1.*`` / ``router.fc2.*``, the MLP gate (present even for the hard and constant routers, which
  never use it: the original's ``router_type == 'soft' or 'sparse'`` is always true);
* the LLM's LoRA weights ``llm_model.base_model.model.….lora_{A,B}.default.weight``.

`convert_original_checkpoint` reads it with ``torch.load(weights_only=True)`` (no code is unpickled), detects
the router variant from the stored config and the keys, writes the connector with ``save_pretrained`` into
``OUTPUT_DIR/connector/`` and the connector + LoRA weights as a recipe checkpoint in ``OUTPUT_DIR`` itself, so
``cmoe unimed eval --checkpoint OUTPUT_DIR`` and ``cmoe unimed analyze`` run on it (with the ``--set`` flags it
reports). Keys it does not know, or expected keys that are absent, raise one `CMoEError` listing them.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from cmoe.connector import build_connector
from cmoe.errors import CMoEError
from cmoe.io import atomic_write, save_tensors
from cmoe.reference_models.unimed.model.collate import IMAGE_TASKS
from cmoe.reference_models.unimed.original import ORIGINAL_TASKS, RECIPE_TO_ORIGINAL

ROUTER_TYPES = ("soft", "sparse", "hard", "constant")
ROUTER_METHODS = {"router_task_token": "task_token", "router_token": "token", "router_task": "task"}
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CONNECTOR_DIR = "connector"
_EXPERT_KEY = re.compile(r"^(moe_layers|llm_proj)\.(\d+)\.(\d+)\.(weight|bias)$")
_LORA_KEY = re.compile(r"^llm_model\.(.+\.(\w+)\.lora_[AB]\.default\.weight)$")
_BUFFER_KEY = re.compile(r"^(llm_model|visual_encoder)\..*\.(rotary_emb\.inv_freq|relative_position_index)$")


@dataclass
class OriginalVariant:
    """What the original model was: its router (``soft``/``sparse``/``hard``/``constant``) and router input
    (``task_token``/``token``/``task``), expert type, sizes and token aggregation."""

    router_type: str
    router_input: str
    expert: str
    num_experts: int
    sparse_topk: int
    token_features: int
    out_features: int
    resample_method: str
    resample_rate: int

    @property
    def in_features(self) -> int:
        """The vision encoder's width (the connector's ``in_features``)."""
        return self.token_features // self.aggregate_tokens

    @property
    def aggregate_tokens(self) -> int:
        return self.resample_rate if self.resample_method == "projection" else 1

    @property
    def uses_router(self) -> bool:
        return self.router_type in ("soft", "sparse")

    @property
    def preset(self) -> str:
        return {"soft": "original", "sparse": "original_sparse", "hard": "original_hard",
                "constant": "original_constant"}[self.router_type]


@dataclass
class Conversion:
    """The result: where things went, the recipe preset and ``--set`` overrides that rebuild the same model,
    the keys that were read but are unused by the original itself, and the epoch the checkpoint was saved at."""

    output_dir: Path
    connector_dir: Path
    variant: OriginalVariant
    overrides: list[str]
    dropped_keys: list[str] = field(default_factory=list)
    lora_tensors: int = 0
    epoch: int | None = None

    def set_flags(self) -> str:
        return " ".join(f"--set {item}" for item in self.overrides)


def read_original_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The original's checkpoint dict, read with ``weights_only=True`` (tensors and plain containers only)."""
    path = Path(path)
    if not path.is_file():
        raise CMoEError(f"checkpoint: expected an original Uni-Med checkpoint file (checkpoint_*.pth), got "
                        f"{str(path)!r} (not found)")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises UnpicklingError, RuntimeError or EOFError depending on the damage
        raise CMoEError(f"checkpoint {path}: could not be read with torch.load(weights_only=True) ({error}); "
                        "expected a file saved by the original's runner (a dict with 'model', 'config', ...)") from None
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise CMoEError(f"checkpoint {path}: expected a dict with a 'model' state dict (the original's "
                        f"checkpoint_*.pth), got {type(data).__name__} with keys "
                        f"{sorted(data)[:8] if isinstance(data, dict) else '-'}")
    return data


def _model_config(data: dict[str, Any]) -> dict[str, Any]:
    config = data.get("config")
    if isinstance(config, dict) and isinstance(config.get("model"), dict):
        return config["model"]
    return {}


def detect_variant(state: dict[str, torch.Tensor], model_config: dict[str, Any] | None = None,
                   router_type: str | None = None, router_method: str | None = None) -> OriginalVariant:
    """The original's connector variant from its stored ``config["model"]`` and the key shapes; `router_type`
    / `router_method` (the original's names, e.g. ``sparse`` / ``router_token``) override or fill in the config."""
    cfg = model_config or {}
    router_type = router_type or cfg.get("router_type")
    if router_type is None:
        raise CMoEError("router_type: the checkpoint stores no config, and soft / sparse / hard / constant "
                        "checkpoints have the same keys; pass router_type (--router-type) explicitly")
    if router_type not in ROUTER_TYPES:
        raise CMoEError(f"router_type: expected one of {ROUTER_TYPES}, got {router_type!r}")
    if cfg.get("has_moe") is False:
        raise CMoEError("checkpoint: config says has_moe: false (a plain projector, no connector-MoE); only "
                        "Uni-Med's MoE connector (projector_type moe_mlp / moe_linear) converts")
    layers = sorted({(int(m[2]), int(m[3])) for key in state if (m := _EXPERT_KEY.match(key))
                     and m[1] == "moe_layers"})
    experts = sorted({e for e, _ in layers})
    if not experts:
        raise CMoEError("checkpoint: no moe_layers.<e>.* keys; expected the original's connector-MoE experts "
                        f"(found keys like {sorted(state)[:5]})")
    if experts != list(range(len(experts))):
        raise CMoEError(f"checkpoint: expert indices {experts} are not 0..{len(experts) - 1}")
    depth = {layer for _, layer in layers}
    expert = "mlp" if depth == {0, 2} else "linear" if depth == {0} else None
    if expert is None:
        raise CMoEError(f"checkpoint: expert layers {sorted(depth)}; expected 0 (moe_linear) or 0 and 2 (moe_mlp)")
    first = state.get("moe_layers.0.0.weight")
    last = state.get(f"moe_layers.0.{max(depth)}.weight")
    if first is None or last is None:
        raise CMoEError("checkpoint: missing moe_layers.0.0.weight; expected every expert's weights")
    token_features, out_features = int(first.shape[1]), int(last.shape[0])
    num_experts = int(cfg.get("num_experts", len(experts)))
    if num_experts != len(experts):
        raise CMoEError(f"checkpoint: config says num_experts={num_experts}, the keys hold {len(experts)} experts")
    method = router_method or cfg.get("router_method")
    if method is None:
        method = _infer_router_method(state, token_features) if router_type in ("soft", "sparse") \
            else "router_task_token"
    if method not in ROUTER_METHODS:
        raise CMoEError(f"router_method: expected one of {sorted(ROUTER_METHODS)}, got {method!r}")
    resample_method = cfg.get("resample_method", "projection")
    if resample_method not in ("projection", "avgpool", "maxpool"):
        raise CMoEError(f"resample_method: expected projection, avgpool or maxpool, got {resample_method!r}")
    rate = int(cfg.get("resample_rate", 4)) if resample_method == "projection" else 1
    if token_features % rate:
        raise CMoEError(f"resample_rate: {rate} does not divide the experts' input width {token_features}")
    return OriginalVariant(router_type, ROUTER_METHODS[method], expert, num_experts,
                           int(cfg.get("sparse_topk", 2)), token_features, out_features, resample_method, rate)


def _infer_router_method(state: dict[str, torch.Tensor], token_features: int) -> str:
    fc1 = state.get("router.fc1.weight")
    task = state.get(f"task_tokens.{ORIGINAL_TASKS[0]}")
    if fc1 is None:
        raise CMoEError("checkpoint: missing router.fc1.weight, which a soft or sparse router needs")
    width = int(fc1.shape[1])
    task_width = int(task.shape[-1]) if task is not None else None
    candidates = [name for name, size in (("router_task_token", token_features + (task_width or 0)),
                                          ("router_token", token_features), ("router_task", task_width))
                  if size == width and (name == "router_token" or task_width is not None)]
    if len(candidates) != 1:
        raise CMoEError(f"router_method: the router's input width {width} fits {candidates or 'none'} of "
                        "router_task_token / router_token / router_task; pass router_method (--router-method)")
    return candidates[0]


def _check_keys(state: dict[str, torch.Tensor], variant: OriginalVariant) -> tuple[dict[str, str], list[str]]:
    """Sort the checkpoint's keys: LoRA weights (original key → recipe name), and keys read but unused by the
    original (duplicates, an unused router or task tokens, saved buffers). Anything else, or anything missing,
    is one error listing all of it."""
    layers = (0, 2) if variant.expert == "mlp" else (0,)
    expected = {f"moe_layers.{e}.{layer}.{kind}" for e in range(variant.num_experts) for layer in layers
                for kind in ("weight", "bias")}
    router_keys = {f"router.{fc}.{kind}" for fc in ("fc1", "fc2") for kind in ("weight", "bias")}
    task_keys = {f"task_tokens.{task}" for task in ORIGINAL_TASKS}
    needs_tasks = variant.uses_router and variant.router_input in ("task", "task_token")
    if variant.uses_router:
        expected |= router_keys
    if needs_tasks:
        expected |= task_keys
    lora: dict[str, str] = {}
    dropped, unknown = [], []
    for key in state:
        if key in expected:
            continue
        if key in router_keys or key in task_keys:  # built by the original but unused by this variant
            dropped.append(key)
        elif (m := _EXPERT_KEY.match(key)) and m[1] == "llm_proj" and f"moe_layers{key[len('llm_proj'):]}" in expected:
            if not torch.equal(state[key], state[f"moe_layers{key[len('llm_proj'):]}"]):
                raise CMoEError(f"checkpoint: {key} differs from its moe_layers twin; the original saves the same "
                                "modules under both names, so this file was altered")
            dropped.append(key)
        elif (m := _LORA_KEY.match(key)) and m[2] in LORA_TARGETS:
            lora[key] = f"llm.model.{m[1]}"
        elif _BUFFER_KEY.match(key):
            dropped.append(key)
        else:
            unknown.append(key)
    missing = sorted(expected - set(state))
    if unknown or missing:
        raise CMoEError(f"checkpoint: keys do not match the original's {variant.router_type} router "
                        f"({variant.router_input}, {variant.num_experts} {variant.expert} experts): unknown "
                        f"{sorted(unknown)}, missing {missing}; expected task_tokens.<task>, "
                        "moe_layers.<e>.{0,2}.{weight,bias} (+ llm_proj.* twins), router.fc1/fc2.* and "
                        "llm_model.*.lora_{A,B}.default.weight")
    return lora, sorted(dropped)


def connector_options(variant: OriginalVariant, state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The recipe's connector options (over the variant's preset) that rebuild the original's connector."""
    options: dict[str, Any] = {"expert": variant.expert, "expert_hidden": None}
    if variant.expert == "mlp":
        options["expert_hidden"] = int(state["moe_layers.0.0.weight"].shape[0])
    if variant.uses_router:
        options["router_hidden"] = int(state["router.fc1.weight"].shape[0])
        options["router_input"] = variant.router_input
        if variant.router_input != "token":
            options["task_embed_dim"] = int(state[f"task_tokens.{ORIGINAL_TASKS[0]}"].shape[-1])
    if variant.router_type == "sparse":
        options["top_k"] = variant.sparse_topk
    return options


def connector_state(variant: OriginalVariant, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The original's connector weights under the `CMoEConnector` names (float32): experts stacked
    ``[E, out, in]``, task tokens as the task-embedding rows in the recipe's task-id order, the MLP gate."""
    fp32 = lambda t: t.detach().to(torch.float32)
    layers = (0, 2) if variant.expert == "mlp" else (0,)
    out: dict[str, torch.Tensor] = {}
    for i, layer in enumerate(layers):
        out[f"experts.weights.{i}"] = torch.stack(
            [fp32(state[f"moe_layers.{e}.{layer}.weight"]) for e in range(variant.num_experts)])
        out[f"experts.biases.{i}"] = torch.stack(
            [fp32(state[f"moe_layers.{e}.{layer}.bias"]) for e in range(variant.num_experts)])
    if variant.uses_router:
        for i, fc in ((0, "fc1"), (2, "fc2")):
            out[f"router.gate.{i}.weight"] = fp32(state[f"router.{fc}.weight"])
            out[f"router.gate.{i}.bias"] = fp32(state[f"router.{fc}.bias"])
        if variant.router_input != "token":
            tokens = []
            for task in IMAGE_TASKS:
                token = state[f"task_tokens.{RECIPE_TO_ORIGINAL[task]}"]
                if token.dim() != 3 or token.shape[:2] != (1, 1):
                    raise CMoEError(f"task_tokens.{RECIPE_TO_ORIGINAL[task]}: expected shape [1, 1, C] "
                                    f"(num_task_tokens 1, the only setting the original runs), got {list(token.shape)}")
                tokens.append(fp32(token[0, 0]))
            out["router.task_embedding.weight"] = torch.stack(tokens)
    return out


def _yaml(value: Any) -> str:
    """`value` as `parse_overrides` reads it back (YAML): strings bare, the rest as JSON (``null``, ``true``)."""
    return value if isinstance(value, str) else json.dumps(value)


def recipe_overrides(variant: OriginalVariant, options: dict[str, Any], lora: dict[str, str],
                     state: dict[str, torch.Tensor], model_config: dict[str, Any]) -> list[str]:
    """``key=value`` overrides that make a recipe config build the converted model."""
    items = [f"model.connector.preset={variant.preset}"]
    items += [f"model.connector.options.{key}={_yaml(value)}" for key, value in options.items()]
    if variant.resample_method == "projection":
        items += ["model.aggregation.kind=reshape", f"model.aggregation.rate={variant.resample_rate}"]
    else:
        items += [f"model.aggregation.kind={'avg' if variant.resample_method == 'avgpool' else 'max'}",
                  "model.aggregation.window=2"]
    if lora:
        rank = int(state[next(k for k in lora if ".lora_A." in k)].shape[0])
        targets = sorted({_LORA_KEY.match(k)[2] for k in lora})
        items += ["model.lora.enabled=true", f"model.lora.r={rank}",
                  f"model.lora.alpha={model_config.get('lora_alpha', 16)}", "model.lora.modules_to_save=null"]
        if set(targets) != set(LORA_TARGETS):
            items.append(f"model.lora.target_modules=[{','.join(targets)}]")
    else:
        items.append("model.lora.enabled=false")
    return items


def _epoch_steps(data: dict[str, Any]) -> tuple[int | None, int]:
    epoch = data.get("epoch")
    epoch = int(epoch) if isinstance(epoch, (int, float)) else None
    run = data.get("config", {}).get("run", {}) if isinstance(data.get("config"), dict) else {}
    iters = run.get("iters_per_epoch") if isinstance(run, dict) else None
    step = (epoch + 1) * int(iters) if epoch is not None and isinstance(iters, int) else 0
    return epoch, step


def convert_original_checkpoint(checkpoint: str | os.PathLike, output_dir: str | os.PathLike, *,
                                router_type: str | None = None, router_method: str | None = None,
                                tokenizer: str | os.PathLike | None = None) -> Conversion:
    """Convert the original's ``checkpoint_*.pth`` into ``output_dir`` (see the module docstring).

    Writes ``connector/`` (``CMoEConnector.save_pretrained``), ``trainable.safetensors`` (connector +
    LoRA under the recipe's parameter names), ``state.json`` (step, the original's config, the overrides) and
    ``conversion.json``; with `tokenizer` (a local tokenizer directory, e.g. LLaMA-2's) a copy in ``tokenizer/``
    (otherwise evaluation takes the config's). The recipe step is ``(epoch + 1) · iters_per_epoch`` when the stored config has them."""
    data = read_original_checkpoint(checkpoint)
    state, model_config = data["model"], _model_config(data)
    bad = sorted(k for k, v in state.items() if not isinstance(v, torch.Tensor))
    if bad:
        raise CMoEError(f"checkpoint: 'model' entries that are not tensors: {bad[:8]}")
    variant = detect_variant(state, model_config, router_type, router_method)
    lora, dropped = _check_keys(state, variant)
    options = connector_options(variant, state)
    from cmoe.reference_models.unimed.model.assembly import connector_config

    config = connector_config(variant.preset, variant.in_features, variant.out_features, variant.aggregate_tokens,
                              options)
    connector = build_connector(config)
    weights = connector_state(variant, state)
    expected = {name: tuple(p.shape) for name, p in connector.state_dict().items()}
    wrong = [f"{name}: expected {expected.get(name)}, got {tuple(t.shape)}" for name, t in weights.items()
             if expected.get(name) != tuple(t.shape)]
    if wrong or set(expected) != set(weights):
        raise CMoEError(f"checkpoint: the connector weights do not fit a {variant.preset} connector: {wrong}, "
                        f"absent {sorted(set(expected) - set(weights))}")
    connector.load_state_dict(weights, strict=True)
    out = Path(output_dir)
    connector_dir = out / CONNECTOR_DIR
    connector.save_pretrained(connector_dir)
    trainable = {f"connector.{name}": p.detach().contiguous() for name, p in connector.named_parameters()}
    trainable.update({name: state[key].detach().contiguous() for key, name in lora.items()})
    epoch, step = _epoch_steps(data)
    overrides = recipe_overrides(variant, options, lora, state, model_config)
    save_tensors(out / "trainable.safetensors", trainable)
    if tokenizer is not None:
        from cmoe.reference_models.unimed.model.tokenizer import load_tokenizer

        # original=True keeps the SentencePiece model beside the tokenizer files (prompts.tokenizer: original)
        load_tokenizer(tokenizer, original=True).save_pretrained(str(out / "tokenizer"))
    record = {"step": step, "frozen_fingerprint": None, "converted_from": str(Path(checkpoint).resolve()),
              "original_epoch": epoch, "original_config": data.get("config"), "recipe_overrides": overrides}
    atomic_write(out / "state.json", lambda path: Path(path).write_text(json.dumps(record, indent=1, default=str)))
    result = Conversion(out, connector_dir, variant, overrides, dropped, len(lora), epoch)
    summary = {**asdict(result), "output_dir": str(out), "connector_dir": str(connector_dir),
               "variant": asdict(variant)}
    atomic_write(out / "conversion.json", lambda path: Path(path).write_text(json.dumps(summary, indent=1)))
    return result
