"""FSDP2 (``train.distributed: fsdp``) for the Uni-Med model: the LLM sharded across ranks, the rest replicated.

What is sharded: every transformer block of the LLM (its frozen base weights and LoRA adapters) is one
``fully_shard`` group, and the root `UniMedModel` a last group holding what is left of the LLM (embeddings,
final norm, ``lm_head`` and peft's ``modules_to_save`` copies). The root group is unsharded for the whole forward,
which covers ``model.llm.embed`` (called outside the LLM's forward) and, through `register_fsdp_forward_method`,
``model.generate``.

What stays replicated: the frozen vision encoder and the connector are left out of FSDP (``ignored_params``), as
DDP would keep them. The connector does not run on a text-only batch, so a rank may hold no connector gradient
while another does; a sharded connector would then reduce-scatter on some ranks only. Kept replicated, its
gradients are averaged by `sync_replicated_grads` with DDP's ``find_unused_parameters`` semantics: a parameter
unused on some ranks gets the mean with zeros, one unused on every rank keeps ``grad=None`` (so AdamW skips it,
weight decay included). At paper scale the connector is ~0.7B fp32 parameters; replicated with its AdamW state it
costs ~11 GB per GPU next to the 7B LLM's shard.

Building it (`build_sharded_model`): rank 0 builds the model as an unsharded run does (same seed, weights, LoRA
init) and loads any checkpoint into it; the other ranks build the same architecture on the meta device
(`model.memory.build_on_meta`), so only rank 0 ever holds the full LLM on the host. Every rank then applies
`shard_model`, the meta ranks allocate only their local shards and the replicated modules (``to_empty``), and
torch's ``set_model_state_dict(..., broadcast_from_rank0=True)`` sends rank 0's values tensor by tensor, each rank
keeping its shard; the non-persistent buffers (RoPE frequencies, position ids), which no state dict holds, are
broadcast after it. Every rank ends with rank 0's values: its shards of the LLM, bit-identical replicated modules.

Checkpoints keep the DDP format: `full_trainable_state` gathers the trainable parameters under their
``named_parameters()`` names and `full_optimizer_state` the optimiser state in ``optimizer.state_dict()`` form
(integer parameter indices), both unsharded and on the CPU; `load_full_state` puts them back into a sharded model.

FSDP2 replaces the module's parameters with sharded ``DTensor`` parameters: build the optimiser after
`shard_model`, use `clip_grad_norm_` (torch's rejects a mix of DTensor and plain gradients) and, for fp16,
`FSDPGradScaler` (it skips the step on every rank when any rank's shard overflowed). Works on CUDA/NCCL and on
CPU/gloo (the tests run there).
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from itertools import chain
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor

from cmoe.errors import CMoEError
from cmoe.reference_models.unimed.config import RecipeConfig
from cmoe.reference_models.unimed.model.assembly import UniMedModel

BLOCK_SUFFIX = "DecoderLayer"


def decoder_layers(model: UniMedModel) -> list[nn.Module]:
    """The LLM's transformer blocks: modules whose class the HF model names in ``_no_split_modules`` (the
    blocks it never splits across devices), else whose class name ends with ``DecoderLayer``; outermost only."""
    hf_model = getattr(model.llm, "model", model.llm)
    names = set(getattr(hf_model, "_no_split_modules", None) or ())
    matches = [module for module in model.llm.modules()
               if (type(module).__name__ in names if names else type(module).__name__.endswith(BLOCK_SUFFIX))]
    inner = {id(sub) for module in matches for sub in module.modules() if sub is not module}
    layers = [module for module in matches if id(module) not in inner]
    if not layers:
        raise CMoEError(f"train.distributed=fsdp: found no transformer blocks in the LLM "
                        f"({type(hf_model).__name__}): expected modules named in its _no_split_modules "
                        f"or whose class name ends with {BLOCK_SUFFIX!r}; use train.distributed=ddp for this LLM")
    return layers


def _check_uniform_dtypes(groups: dict[str, list[nn.Parameter]]) -> None:
    for where, params in groups.items():
        dtypes = {p.dtype for p in params if p.requires_grad}
        if len(dtypes) > 1:
            raise CMoEError(f"train.distributed=fsdp: the trainable parameters of {where} mix dtypes "
                            f"{sorted(str(d) for d in dtypes)}; FSDP shards each block in one dtype. Build the "
                            "LLM in one dtype (model.dtype: float32) or drop lora.modules_to_save, or use ddp")


def shard_model(model: UniMedModel, device: torch.device) -> UniMedModel:
    """Apply FSDP2 in place over all ranks of the default process group: each LLM block, then the root (see the
    module docstring for what stays replicated). Returns `model`, now an `FSDPModule`.

    Call it on the model as built (CPU is fine: each rank then copies only its shards to `device`), after
    loading any checkpointed weights into it and before creating the optimiser; or through
    `build_sharded_model`, which calls it on a meta-built model on the ranks other than 0."""
    if not dist.is_initialized():
        raise CMoEError("train.distributed=fsdp: torch.distributed is not initialised; launch with torchrun "
                        "(torchrun --nproc_per_node N -m cmoe unimed train ...)")
    if isinstance(model, FSDPModule):
        raise CMoEError("shard_model: the model is already sharded")
    device = torch.device(device)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    replicated = [model.vision_encoder, model.connector]
    for module in replicated:
        if not _on_meta(module):  # a meta-built model is allocated later (`build_sharded_model`)
            module.to(device)
    ignored = {p for module in replicated for p in module.parameters()}
    layers = decoder_layers(model)
    in_layers = {p for layer in layers for p in layer.parameters()}
    _check_uniform_dtypes({
        **{f"LLM block {i} ({type(layer).__name__})": list(layer.parameters()) for i, layer in enumerate(layers)},
        "the LLM's embeddings / norm / head": [p for p in model.parameters()
                                               if p not in in_layers and p not in ignored]})
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh, ignored_params=ignored)
    register_fsdp_forward_method(model, "generate")
    # The output's routing weights are a view kept for logging only (never modified in place), which FSDP2
    # warns about on every first forward.
    warnings.filterwarnings("ignore", message=rf"FSDP2-wrapped module \({type(model).__name__}\) returned a view",
                            category=UserWarning)
    return model


def _on_meta(module: nn.Module) -> bool:
    return any(t.is_meta for t in chain(module.parameters(), module.buffers()))


@torch.no_grad()
def _broadcast_non_persistent_buffers(model: nn.Module) -> None:
    """Rank 0's non-persistent buffers to every rank (no state dict holds them), in ``named_buffers`` order."""
    rank = dist.get_rank()
    for module in model.modules():
        for name in sorted(module._non_persistent_buffers_set):
            buffer = getattr(module, name, None)
            if not isinstance(buffer, torch.Tensor):
                continue
            sent = buffer.contiguous() if rank == 0 else torch.empty(buffer.shape, dtype=buffer.dtype,
                                                                     device=buffer.device)
            dist.broadcast(sent, src=0)
            if rank != 0:
                buffer.copy_(sent)


def build_sharded_model(config: RecipeConfig, tokenizer: Any, device: torch.device,
                        prepare: Callable[[UniMedModel], None] | None = None) -> tuple[UniMedModel, str]:
    """The Uni-Med model of `config`, sharded over all ranks by `shard_model`, without any rank but 0 holding
    the full LLM (see the module docstring). Rank 0 seeds with ``config.seed``, builds the model and calls
    `prepare` on it (e.g. loading a checkpoint's trainable weights) before its values are broadcast. A
    collective: every rank calls it with the same config and tokenizer.

    Returns the sharded model and `frozen_fingerprint` of the unsharded one, as rank 0 computed it (the
    meta-built ranks have no values to hash). An error in rank 0's build or `prepare` is raised on every rank."""
    from cmoe.reference_models.unimed.model.assembly import build_model
    from cmoe.reference_models.unimed.model.checkpoint import frozen_fingerprint
    from cmoe.reference_models.unimed.model.memory import build_on_meta

    if not dist.is_initialized():
        raise CMoEError("train.distributed=fsdp: torch.distributed is not initialised; launch with torchrun "
                        "(torchrun --nproc_per_node N -m cmoe unimed train ...)")
    rank = dist.get_rank()
    outcome: list[Any] = [None, None]  # fingerprint, error message
    error: BaseException | None = None
    if rank == 0:
        try:
            torch.manual_seed(config.seed)
            model = build_model(config.model, tokenizer)
            if prepare is not None:
                prepare(model)
            outcome[0] = frozen_fingerprint(model)
            full_state = model.state_dict()
        except Exception as caught:  # every rank must leave the collective below, then raise
            error = caught
            outcome[1] = f"{type(caught).__name__}: {caught}"
    else:
        model = build_on_meta(config, tokenizer)
        full_state = {}
    dist.broadcast_object_list(outcome, src=0)
    if error is not None:
        raise error
    if outcome[1] is not None:
        raise CMoEError(f"build_sharded_model: rank 0 failed to build or prepare the model ({outcome[1]}); "
                        "see rank 0's error")
    shard_model(model, device)
    if rank != 0:
        model.to_empty(device=device)
    set_model_state_dict(model, full_state,
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    del full_state
    _broadcast_non_persistent_buffers(model)
    return model, outcome[0]


def is_sharded(model: nn.Module) -> bool:
    """Whether `shard_model` was applied to `model`."""
    return isinstance(model, FSDPModule)


def _replicated_trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad and not isinstance(p, DTensor)]


@contextmanager
def no_sync(model: nn.Module) -> Iterator[None]:
    """Accumulate gradients locally (no reduce-scatter) for the micro-batches before the last, like DDP's
    ``no_sync``; the replicated connector needs nothing, as `sync_replicated_grads` runs after the last."""
    if not isinstance(model, FSDPModule):
        raise CMoEError("no_sync: expected a model sharded by shard_model")
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


@torch.no_grad()
def sync_replicated_grads(model: nn.Module) -> None:
    """Average the gradients of the trainable parameters FSDP does not manage (the connector) over the ranks,
    as DDP with ``find_unused_parameters`` does. Every rank must call it, after the last backward of a step."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    params = _replicated_trainable(model)
    if not params:
        return
    world = dist.get_world_size()
    used = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=params[0].device)
    dist.all_reduce(used)
    for parameter, count in zip(params, used.tolist()):
        if count == 0:
            parameter.grad = None
            continue
        if parameter.grad is None:
            parameter.grad = torch.zeros_like(parameter)
        dist.all_reduce(parameter.grad)
        parameter.grad.div_(world)


@torch.no_grad()
def clip_grad_norm_(parameters: Iterable[nn.Parameter], max_norm: float) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_` (L2) for a mix of sharded (DTensor) and replicated gradients: the
    squared norms of the local shards are summed over the ranks, the replicated ones counted once. Every rank
    must call it (with the same parameters); returns the total norm before clipping."""
    parameters = list(parameters)
    grads = [p.grad for p in parameters if p.grad is not None]
    sharded = [g.to_local() for g in grads if isinstance(g, DTensor)]
    plain = [g for g in grads if not isinstance(g, DTensor)]
    device = parameters[0].device if parameters else torch.device("cpu")
    sharded_square = torch.zeros((), dtype=torch.float32, device=device)
    plain_square = torch.zeros((), dtype=torch.float32, device=device)
    for tensor in sharded:
        sharded_square += tensor.float().pow(2).sum().to(device)
    for tensor in plain:
        plain_square += tensor.float().pow(2).sum().to(device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(sharded_square)
    total = (sharded_square + plain_square).sqrt()
    coefficient = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for tensor in sharded + plain:
        tensor.mul_(coefficient.to(tensor.device, tensor.dtype))
    return total


class FSDPGradScaler(torch.amp.GradScaler):
    """`torch.amp.GradScaler` for a sharded model: the inf/NaN check runs on each rank's local shards and its
    result is all-reduced, so every rank skips (or takes) the same steps. Used in place of ``GradScaler``."""

    def _unscale_grads_(self, optimizer: torch.optim.Optimizer, inv_scale: torch.Tensor, found_inf: torch.Tensor,
                        allow_fp16: bool) -> dict[torch.device, torch.Tensor]:
        grads: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = defaultdict(list)
        with torch.no_grad():
            for group in optimizer.param_groups:
                for parameter in group["params"]:
                    if parameter.grad is None:
                        continue
                    if not allow_fp16 and parameter.grad.dtype == torch.float16:
                        raise ValueError("Attempting to unscale FP16 gradients.")
                    grad = parameter.grad.to_local() if isinstance(parameter.grad, DTensor) else parameter.grad
                    grads[(grad.device, grad.dtype)].append(grad)
            found = {found_inf.device: found_inf}
            for (device, _), tensors in grads.items():
                found.setdefault(device, found_inf.new_zeros((), device=device))
                torch._amp_foreach_non_finite_check_and_unscale_(tensors, found[device], inv_scale.to(device))
            if dist.is_initialized() and dist.get_world_size() > 1:
                total = sum(value.to(found_inf.device) for value in found.values())
                dist.all_reduce(total, op=dist.ReduceOp.MAX)
                found = {found_inf.device: total}
        return found


def trainable_names(model: nn.Module) -> list[str]:
    """The names a checkpoint's ``trainable.safetensors`` uses: ``named_parameters()`` with requires_grad."""
    return [name for name, p in model.named_parameters() if p.requires_grad]


def full_trainable_state(model: nn.Module, rank0_only: bool = True) -> dict[str, torch.Tensor]:
    """The unsharded trainable parameters on the CPU, named as in ``trainable.safetensors``. A collective: every
    rank calls it; with `rank0_only` the others get ``{}`` (and no rank holds the full set on its device)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=rank0_only, ignore_frozen_params=True)
    state = get_model_state_dict(model, options=options)
    if rank0_only and dist.get_rank() != 0:
        return {}
    missing = [name for name in trainable_names(model) if name not in state]
    if missing:
        raise CMoEError(f"full_trainable_state: the gathered state lacks {missing[:5]}; the model's parameter "
                        "names differ from its state-dict keys")
    return {name: state[name].detach().cpu().contiguous() for name in trainable_names(model)}


def _optimizer_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[list[str]]:
    names = {id(p): name for name, p in model.named_parameters()}
    try:
        return [[names[id(p)] for p in group["params"]] for group in optimizer.param_groups]
    except KeyError:
        raise CMoEError("optimizer: it holds parameters the model does not have; create it after shard_model "
                        "(FSDP replaces the parameters)") from None


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer,
                         rank0_only: bool = True) -> dict[str, Any]:
    """The unsharded optimiser state on the CPU, in ``optimizer.state_dict()`` form (integer parameter indices in
    param-group order), as an unsharded run would save it. A collective like `full_trainable_state`."""
    if not optimizer.state:
        # torch's get_optimizer_state_dict would take a zero-lr step to create the state; nothing to gather.
        return optimizer.state_dict() if not rank0_only or dist.get_rank() == 0 else {}
    options = StateDictOptions(full_state_dict=True, cpu_offload=rank0_only)
    state = get_optimizer_state_dict(model, optimizer, options=options)
    if rank0_only and dist.get_rank() != 0:
        return {}
    index = {name: i for i, name in enumerate(n for group in _optimizer_names(model, optimizer) for n in group)}
    tensors = {index[name]: {key: value.detach().cpu() if isinstance(value, torch.Tensor) else value
                             for key, value in values.items()}
               for name, values in state["state"].items()}
    groups, start = [], 0
    for group in state["param_groups"]:
        groups.append({**group, "params": list(range(start, start + len(group["params"])))})
        start += len(group["params"])
    return {"state": dict(sorted(tensors.items())), "param_groups": groups}


def load_full_trainable(model: nn.Module, trainable: dict[str, torch.Tensor], where: str = "checkpoint") -> None:
    """Copy full (unsharded) trainable parameters into a sharded model; every rank passes the same dict."""
    params = dict(model.named_parameters())
    expected = trainable_names(model)
    unknown = sorted(set(trainable) - set(expected))
    absent = sorted(set(expected) - set(trainable))
    if unknown or absent:
        raise CMoEError(f"{where}: parameters do not match the model: unexpected {unknown[:5]}, missing "
                        f"{absent[:5]}; was it written for another connector preset or LoRA setting?")
    for name, value in trainable.items():
        if tuple(params[name].shape) != tuple(value.shape):
            raise CMoEError(f"{where}: parameter {name}: expected shape {tuple(params[name].shape)}, got "
                            f"{tuple(value.shape)}")
    set_model_state_dict(model, dict(trainable), options=StateDictOptions(full_state_dict=True, strict=False))


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any],
                              where: str = "checkpoint") -> None:
    """Load an ``optimizer.state_dict()``-form state (as `full_optimizer_state` returns, or as a DDP run saved
    it) into the optimiser of a sharded model; every rank passes the same state."""
    names = _optimizer_names(model, optimizer)
    sizes = [len(group["params"]) for group in state["param_groups"]]
    if sizes != [len(group) for group in names]:
        raise CMoEError(f"{where}: the optimiser state has param groups of sizes {sizes}, the optimiser "
                        f"{[len(group) for group in names]}; was it written for another model?")
    flat = [name for group in names for name in group]
    by_name = {flat[int(index)]: values for index, values in state["state"].items()}
    groups = [{**saved, "params": group} for saved, group in zip(state["param_groups"], names)]
    # strict=False: a parameter never updated yet (the connector after text-only steps) has no saved state.
    set_optimizer_state_dict(model, optimizer, {"state": by_name, "param_groups": groups},
                             options=StateDictOptions(full_state_dict=True, strict=False))
    # torch creates the state of every parameter with a zero-lr step first; those without saved state must
    # start fresh, as in the run that wrote the checkpoint.
    params = dict(model.named_parameters())
    for name in set(flat) - set(by_name):
        optimizer.state.pop(params[name], None)


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer | None,
                    trainable: dict[str, torch.Tensor] | None, optimizer_state: dict[str, Any] | None,
                    where: str = "checkpoint") -> None:
    """`load_full_trainable` and `load_full_optimizer_state` together (either part may be None)."""
    if trainable is not None:
        load_full_trainable(model, trainable, where)
    if optimizer is not None and optimizer_state is not None:
        load_full_optimizer_state(model, optimizer, optimizer_state, where)
