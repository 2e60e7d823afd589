"""Run by `test_unimed_fsdp.py` under torchrun (2 ranks): train the tiny model sharded with FSDP2 on fixed
batches while rank 0 trains an unsharded copy on both ranks' batches (DDP's averaged gradients), checkpoint the
full state after the first step and resume it into a second sharded model that must then train identically.
Writes everything the test compares to the output folder (argument 1; ``checkpointing`` as argument 2 turns
on the LLM's gradient checkpointing).

The steps: text only on every rank (the connector is unused everywhere, so it has no optimiser state at the
checkpoint), text only on rank 0 and images on rank 1 (the connector runs on one rank), two accumulated
micro-batches, and a step whose gradients overflow on rank 1 only (the scaler must skip it on both ranks)."""

from __future__ import annotations

import json
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

from cmoe.errors import CMoEError  # noqa: E402

from cmoe.reference_models.unimed.training import distributed  # noqa: E402
from cmoe.reference_models.unimed.model.checkpoint import (  # noqa: E402
    _flatten_optimizer,
    _unflatten_optimizer,
    frozen_fingerprint,
)
from cmoe.reference_models.unimed.model.collate import Collator  # noqa: E402
from cmoe.reference_models.unimed.training.distributed import (  # noqa: E402
    FSDPGradScaler,
    build_sharded_model,
    clip_grad_norm_,
    full_optimizer_state,
    full_trainable_state,
    is_sharded,
    load_full_state,
    no_sync,
    shard_model,
    sync_replicated_grads,
)
from cmoe.reference_models.unimed.model.assembly import UniMedModel, build_model  # noqa: E402
from cmoe.reference_models.unimed.data.splits import load_split  # noqa: E402
from cmoe.reference_models.unimed.training.train import (  # noqa: E402
    finish_distributed,
    init_distributed,
    learning_rate,
    make_tokenizer,
    parameter_groups,
)
from unimed_tiny import test_config  # noqa: E402

out = Path(sys.argv[1])
gradient_checkpointing = len(sys.argv) > 2 and sys.argv[2] == "checkpointing"
ctx = init_distributed()
rank, world = ctx.rank, ctx.world_size
config = test_config(out / "run", model__lora={"dropout": 0.0}, model__gradient_checkpointing=gradient_checkpointing)
train = config.train
samples = load_split(config.data, config.data.train_split)
tokenizer = make_tokenizer(config, samples)
qa = [s for s in samples if s.task == "qa"]
images = [s for s in samples if s.task != "qa"]
STEPS = [
    [[qa[0:2]], [qa[2:4]]],
    [[qa[4:6]], [images[0:2]]],
    [[images[2:4], qa[6:8]], [images[4:6], images[6:8]]],
]
OVERFLOW = [[images[8:10]], [images[10:12]]]


def fresh_model() -> UniMedModel:
    torch.manual_seed(config.seed)
    model = build_model(config.model, tokenizer)
    model.train()
    return model


def optimizer_for(model: UniMedModel) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """The trainer's AdamW and warm-up/cosine schedule."""
    optimizer = torch.optim.AdamW(parameter_groups(model, train.weight_decay), lr=train.lr,
                                  betas=tuple(train.betas), fused=False)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: learning_rate(step, train) / train.lr)


def trainable(model: UniMedModel) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def sharded_step(model: UniMedModel, optimizer: torch.optim.Optimizer, scheduler: Any, micro_batches: list,
                 scaler: FSDPGradScaler | None = None, overflow: bool = False) -> float:
    """One step the way the trainer runs it with FSDP: no_sync before the last micro-batch, connector grads
    synced, scaler unscale, clip, step."""
    for index, batch in enumerate(micro_batches):
        with no_sync(model) if index < len(micro_batches) - 1 else nullcontext():
            loss = model(collator(batch)).loss / len(micro_batches)
            (scaler.scale(loss) if scaler else loss).backward()
    sync_replicated_grads(model)
    if overflow and rank == 1:
        grad = next(p.grad for p in trainable(model) if isinstance(p.grad, DTensor) and p.grad.to_local().numel())
        grad.to_local().view(-1)[0] = float("inf")
    if scaler:
        scaler.unscale_(optimizer)
    norm = float(clip_grad_norm_(trainable(model), train.max_grad_norm))
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


def reference_step(model: UniMedModel, optimizer: torch.optim.Optimizer, scheduler: Any,
                   micro_batches_per_rank: list) -> float:
    """The same step unsharded in one process: each rank's gradients, averaged as DDP does (None where no
    rank used a parameter)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    per_rank = []
    for micro_batches in micro_batches_per_rank:
        optimizer.zero_grad(set_to_none=True)
        for batch in micro_batches:
            (model(collator(batch)).loss / len(micro_batches)).backward()
        per_rank.append([None if p.grad is None else p.grad.clone() for _, p in named])
    optimizer.zero_grad(set_to_none=True)
    for index, (_, parameter) in enumerate(named):
        grads = [grads[index] for grads in per_rank]
        if any(g is not None for g in grads):
            parameter.grad = sum(g if g is not None else torch.zeros_like(parameter) for g in grads) / len(grads)
    norm = float(torch.nn.utils.clip_grad_norm_(trainable(model), train.max_grad_norm))
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


def save_optimizer(state: dict[str, Any], name: str) -> None:
    tensors, meta = _flatten_optimizer(state)
    save_file(tensors, str(out / f"{name}.safetensors"))
    (out / f"{name}.json").write_text(json.dumps(meta))


def record_shard_model_input(model: UniMedModel, device: torch.device) -> UniMedModel:
    """Spy on what `build_sharded_model` hands to `shard_model`: which parts are still on the meta device."""
    report["meta_at_sharding"] = {part: sorted({p.is_meta for p in getattr(model, part).parameters()})
                                  for part in ("llm", "vision_encoder", "connector")}
    return shard_model(model, device)


def local_shards(model: UniMedModel) -> dict[str, Any]:
    """The LLM's local shard sizes against FSDP2's dim-0 ``torch.chunk`` split of the full parameters."""
    local = full = 0
    expected = True
    for parameter in model.llm.parameters():
        rows = torch.empty(parameter.shape[0], device="meta").chunk(world)
        shape = (rows[rank].numel() if rank < len(rows) else 0, *parameter.shape[1:])
        expected &= isinstance(parameter, DTensor) and tuple(parameter.to_local().shape) == shape
        local += parameter.to_local().numel()
        full += parameter.numel()
    return {"expected": expected, "local": local, "full": full}


def full_values(model: UniMedModel) -> dict[str, torch.Tensor]:
    """Every parameter and persistent buffer (gathered when sharded), and every buffer as ``buffer:name``."""
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True)) if is_sharded(model) \
        else model.state_dict()
    state.update({f"buffer:{name}": value for name, value in model.named_buffers()})
    return {name: value.detach().clone().contiguous() for name, value in state.items()}


report: dict = {"world": world}
distributed.shard_model = record_shard_model_input
model, fingerprint = build_sharded_model(config, tokenizer, ctx.device)
distributed.shard_model = shard_model
model.train()
report["local_shards"] = local_shards(model)
report["fingerprint"] = fingerprint
save_file(full_values(model), str(out / f"initial_rank{rank}.safetensors"))
collator = Collator(tokenizer, model.vision_encoder.image_size, config.model.image_mean, config.model.image_std,
                    config.model.max_text_tokens)
prompts = Collator(tokenizer, model.vision_encoder.image_size, config.model.image_mean, config.model.image_std,
                   config.model.max_text_tokens, with_answers=False)
reference = fresh_model() if rank == 0 else None
if reference is not None:
    save_file(full_values(reference), str(out / "initial_reference.safetensors"))
    report["reference_fingerprint"] = frozen_fingerprint(reference)
optimizer, scheduler = optimizer_for(model)
report["kinds"] = sorted({type(p).__name__ for p in model.parameters()})

model.eval()
report["generated"] = model.generate(prompts(images[:2] + qa[:1]), max_new_tokens=4)
model.train()
if reference is not None:
    reference.eval()
    report["reference_generated"] = reference.generate(prompts(images[:2] + qa[:1]), max_new_tokens=4)
    reference.train()

# Step 1 (text only everywhere: the connector has no optimiser state yet), then a checkpoint of the full state.
report["norms"] = [sharded_step(model, optimizer, scheduler, STEPS[0][rank])]
trainable_state = full_trainable_state(model)
optimizer_state = full_optimizer_state(model, optimizer)
full = full_trainable_state(model, rank0_only=False)
report["rank0_only_matches"] = trainable_state.keys() == full.keys() and all(
    torch.equal(trainable_state[k], full[k]) for k in full)
report["rank0_only_empty"] = not trainable_state and not optimizer_state
if rank == 0:
    (out / "step1").mkdir()
    save_file(trainable_state, str(out / "step1" / "trainable.safetensors"))
    save_optimizer(optimizer_state, "step1/optimizer")
dist.barrier()

# Resume from it into a fresh sharded model; from here both models must train identically.
restored = fresh_model()
shard_model(restored, ctx.device)
restored_optimizer, restored_scheduler = optimizer_for(restored)
restored_scheduler.load_state_dict(scheduler.state_dict())
load_full_state(restored, restored_optimizer, load_file(str(out / "step1" / "trainable.safetensors")),
                _unflatten_optimizer(load_file(str(out / "step1" / "optimizer.safetensors")),
                                     json.loads((out / "step1" / "optimizer.json").read_text())))
report["resumed_state_params"] = len(restored_optimizer.state)

scalers = [FSDPGradScaler("cpu", init_scale=2.0 ** 6) for _ in range(2)]
for step in STEPS[1:]:
    report["norms"].append(sharded_step(model, optimizer, scheduler, step[rank], scalers[0]))
    sharded_step(restored, restored_optimizer, restored_scheduler, step[rank], scalers[1])
before = full_trainable_state(model, rank0_only=False)
sharded_step(model, optimizer, scheduler, OVERFLOW[rank], scalers[0], overflow=True)
sharded_step(restored, restored_optimizer, restored_scheduler, OVERFLOW[rank], scalers[1], overflow=True)
after = full_trainable_state(model, rank0_only=False)
report["overflow_skipped"] = all(torch.equal(before[k], after[k]) for k in before)
report["scale"] = [scaler.get_scale() for scaler in scalers]

save_file(full_trainable_state(model, rank0_only=False), str(out / f"full_rank{rank}.safetensors"))
save_file(full_trainable_state(restored, rank0_only=False), str(out / f"restored_rank{rank}.safetensors"))
save_optimizer(full_optimizer_state(model, optimizer, rank0_only=False), f"optimizer_rank{rank}")
save_optimizer(full_optimizer_state(restored, restored_optimizer, rank0_only=False), f"restored_optimizer_rank{rank}")
if reference is not None:
    reference_optimizer, reference_scheduler = optimizer_for(reference)
    report["reference_norms"] = [reference_step(reference, reference_optimizer, reference_scheduler, step)
                                 for step in STEPS]
    reference_scheduler.step()  # the skipped overflow step still advances the schedule, as in the trainer
    save_file({n: p.detach().contiguous() for n, p in reference.named_parameters() if p.requires_grad},
              str(out / "reference.safetensors"))
    save_optimizer(reference_optimizer.state_dict(), "reference_optimizer")


def failing_prepare(model: UniMedModel) -> None:
    raise CMoEError("checkpoint: the frozen weights differ (raised on purpose)")


try:  # an error in rank 0's prepare (e.g. a checkpoint that does not fit) must reach every rank, not hang it
    build_sharded_model(config, tokenizer, ctx.device, failing_prepare)
    report["prepare_error"] = None
except CMoEError as error:
    report["prepare_error"] = str(error)
(out / f"report_rank{rank}.json").write_text(json.dumps(report))
finish_distributed()
