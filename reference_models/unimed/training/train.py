"""The training loop: multi-task batches → autocast forward → accumulated backward → AdamW step, with
JSONL metrics (per-task loss, routing weights per task), atomic checkpoints and exact resume.

Multi-process training goes through torchrun (``torchrun --nproc_per_node N -m cmoe unimed train ...``): each
rank takes every N-th batch of the one deterministic batch stream, and DDP averages the gradients.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from cmoe.auto import choices_recorded_in
from cmoe.errors import CMoEError
from cmoe.io import atomic_write, write_json
from cmoe.reference_models.unimed.analysis.analyze import REPORT_DIR, TugOfWarProbe, report_meta
from cmoe.reference_models.unimed.analysis.plots import write_report
from cmoe.reference_models.unimed.analysis.report import TugOfWarReport
from cmoe.reference_models.unimed.config import RecipeConfig, TrainSection
from cmoe.reference_models.unimed.data.mixing import build_sampler
from cmoe.reference_models.unimed.data.sample import Sample
from cmoe.reference_models.unimed.data.splits import load_split
from cmoe.reference_models.unimed.instructions import DrawnInstructions, keyed_batches
from cmoe.reference_models.unimed.model.assembly import UniMedModel, build_model
from cmoe.reference_models.unimed.model.checkpoint import (
    checkpoint_step,
    find_latest,
    frozen_fingerprint,
    list_checkpoints,
    load_trainable,
    load_training_state,
    read_checkpoint,
    resume_note,
    rng_state,
    save_checkpoint,
    save_connector_init,
)
from cmoe.reference_models.unimed.model.collate import Collator
from cmoe.reference_models.unimed.model.tokenizer import build_word_tokenizer, load_tokenizer
from cmoe.reference_models.unimed.prompt_style import run_record
from cmoe.reference_models.unimed.prompts import build_prompt
from cmoe.reference_models.unimed.tasks import get_task
from cmoe.reference_models.unimed.training import distributed, run_folder
from cmoe.reference_models.unimed.training.curves import CURVES_DIR, TensorBoardLog, plot_curves

METRICS_FILE = "metrics.jsonl"
AUTO_CHOICES_FILE = "auto_backends.json"  # cmoe.auto's measured backend choices for this run (rank 0's)


def auto_choices_file(rank: int) -> str:
    """Where rank `rank` records the backends ``auto`` measured for it: every rank times and chooses for itself,
    and a resumed rank must compute with exactly what it chose (one shared file would keep the last writer's)."""
    return AUTO_CHOICES_FILE if rank == 0 else f"auto_backends.rank{rank}.json"


def learning_rate(step: int, train: TrainSection) -> float:
    """The original's schedule: linear warm-up ``warmup_start_lr → lr`` over ``warmup_steps``, then cosine
    decay to ``min_lr`` at ``steps``."""
    if step < train.warmup_steps:
        return train.warmup_start_lr + (train.lr - train.warmup_start_lr) * step / train.warmup_steps
    progress = min(1.0, (step - train.warmup_steps) / max(1, train.steps - train.warmup_steps))
    return train.min_lr + (train.lr - train.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def resuming_line(checkpoint: Path, state: dict[str, Any], run: Path, train: TrainSection, target: int) -> str:
    """The line a resumed run prints: from which checkpoint and step to which, and what changed in the schedule
    (``train.steps`` sets the cosine's length: a new value reshapes the learning rate from here on; training past
    it stays at ``min_lr``)."""
    step = int(state.get("step", 0))
    line = f"resuming {run} from {checkpoint.name} (step {step}) to step {target}"
    saved = (state.get("config") or {}).get("train", {}) if isinstance(state.get("config"), dict) else {}
    before = saved.get("steps")
    if isinstance(before, int) and before != train.steps:
        line += (f"; train.steps is now {train.steps} (it was {before}): the cosine schedule is that long now, the "
                 f"learning rate at step {step} is {learning_rate(step, train):.3g}")
    if target > train.steps:
        line += (f"; steps past train.steps ({train.steps}) keep the schedule's end, min_lr {train.min_lr:g} "
                 "(raise train.steps to stretch the schedule instead)")
    return line


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters with weight decay, except biases, norms and other 1-d parameters (the original's
    no-decay rules)."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        plain = parameter.ndim < 2 or name.endswith(".bias") or "norm" in name.lower()
        (no_decay if plain else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@dataclass
class DistributedContext:
    """Rank, world size and device of this process (torchrun's environment, or a single process)."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistributedContext:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1): NCCL on GPUs, gloo on CPUs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return DistributedContext(rank, world, device)


def finish_distributed() -> None:
    """Leave the process group cleanly at the end of a successful multi-process run: wait until every rank is
    past its last collective, then destroy the group. A process that exits with the group alive (or destroys
    it while a peer is still in a collective) can abort in gloo's worker threads at interpreter shutdown
    (``terminate called without an active exception``), failing a run that had finished. A no-op without a
    process group; call it on every rank, and not after an error (a peer that failed never reaches the
    barrier)."""
    if not dist.is_initialized():
        return
    dist.barrier()
    dist.destroy_process_group()


def prompt_texts(samples: list[Sample]) -> list[str]:
    """Every prompt and answer of `samples` (the text a word-level tokenizer must cover)."""
    return [f"{build_prompt(get_task(s.task), s.fields).prompt} {s.answer}" for s in samples]


def make_tokenizer(config: RecipeConfig, train_samples: list[Sample]):
    section = config.model.tokenizer
    if section.kind == "word_level":
        return build_word_tokenizer(prompt_texts(train_samples))
    return load_tokenizer(section.path, original=config.prompts.resolved().tokenizer == "original")


def autocast(precision: str, device: torch.device):
    """The autocast context of a precision (``fp32`` → none). fp16 needs a GPU (and gets a grad scaler)."""
    if precision == "fp32":
        return nullcontext()
    if precision == "fp16" and device.type != "cuda":
        raise CMoEError("train.precision: fp16 autocast needs a CUDA GPU; use bf16 or fp32 on a CPU")
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def _metric_step(line: str) -> int | None:
    """The step of one metrics.jsonl line; None for a line cut short by a kill (dropped when trimming)."""
    try:
        step = json.loads(line).get("step")
    except (ValueError, AttributeError):
        return None
    return step if isinstance(step, int) else None


def step_memory_estimate(model: UniMedModel, config: RecipeConfig):
    """The memory one training step of `model` needs on one device (`memory.estimate_memory`), for the
    longest text the config allows."""
    from cmoe.reference_models.unimed.model.memory import estimate_memory

    aggregation = config.model.aggregation
    merged = {"reshape": aggregation.rate, "avg": aggregation.window ** 2, "max": aggregation.window ** 2}
    visual = model.vision_encoder.num_patches // merged.get(aggregation.kind, 1)
    return estimate_memory(model, config.train.batch_size, config.model.max_text_tokens, visual,
                           config.model.gradient_checkpointing)


@dataclass
class TrainResult:
    output_dir: Path
    step: int
    checkpoint: Path | None
    history: list[dict[str, Any]]


class _Window:
    """Running sums between two log lines: loss, per-task loss, aux loss and routing weight per task."""

    def __init__(self) -> None:
        self.loss = self.aux = 0.0
        self.steps = self.samples = 0
        self.task_loss: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
        self.routing: dict[str, list[Any]] = {}

    def add(self, tasks: list[str], image_tasks: list[str], out: Any, micro_loss: float) -> None:
        self.loss += micro_loss
        self.aux += float(out.aux_loss)
        self.steps += 1
        self.samples += len(tasks)
        for task, value in zip(tasks, out.sample_losses.tolist()):
            self.task_loss[task][0] += value
            self.task_loss[task][1] += 1
        if out.routing_weights is not None:
            per_image = out.routing_weights.detach().float().mean(1).cpu()
            for task, weights in zip(image_tasks, per_image):
                total = self.routing.setdefault(task, [torch.zeros_like(weights), 0])
                total[0] += weights
                total[1] += 1

    def record(self, step: int, lr: float, elapsed: float, grad_norm: float | None) -> dict:
        record = {"step": step, "lr": lr, "loss": self.loss / max(1, self.steps),
                  "aux_loss": self.aux / max(1, self.steps),
                  "task_loss": {t: s / max(1, n) for t, (s, n) in sorted(self.task_loss.items())},
                  "samples_per_s": self.samples / max(elapsed, 1e-9)}
        if grad_norm is not None:
            record["grad_norm"] = grad_norm
        if self.routing:
            record["routing"] = {t: (s / n).tolist() for t, (s, n) in sorted(self.routing.items())}
        return record


class Trainer:
    """Builds data, tokenizer, model, optimiser and schedule from a `RecipeConfig`, and trains.

    `resume`: ``"auto"`` continues from ``output_dir/latest`` when it exists, a path continues from that
    checkpoint, None starts fresh (an existing ``latest`` is then an error, so no run is overwritten by accident).
    """

    def __init__(self, config: RecipeConfig, output_dir: str | os.PathLike | None = None,
                 resume: str | os.PathLike | None = "auto"):
        self.config = config
        self.style = config.prompts.resolved()
        self.output_dir = Path(output_dir or config.output_dir)
        self.resume = resume
        self.ctx = init_distributed()

    def close(self) -> None:
        """Leave the process group at the end of a successful run, on every rank (`finish_distributed`), after
        dropping the DDP wrapper: its reducer holds the group, and a group destroyed by it later joins gloo's
        threads while holding the GIL that one of them may still need, so the process hangs at exit (seen after
        torchrun's elastic restarts; pytorch issue 56297)."""
        if hasattr(self, "wrapped"):
            self.wrapped = self.model
        finish_distributed()

    def _checkpoint_to_resume(self) -> Path | None:
        if not hasattr(self, "_resume_from"):  # every rank, first: rank 0 cleans, checks sharing and chooses
            self._resume_from = run_folder.open_run_folder(self.output_dir, self.ctx.rank, self.ctx.world_size,
                                                           self._find_checkpoint)
        return self._resume_from

    def _find_checkpoint(self) -> Path | None:
        if self.resume is None:
            if list_checkpoints(self.output_dir) or (self.output_dir / "latest").exists():
                raise CMoEError(f"output_dir {self.output_dir} already holds checkpoints; resume from them "
                                "(--resume auto) or choose another --output-dir")
            return None
        if self.resume == "auto":
            return find_latest(self.output_dir)
        return Path(self.resume)

    def finished_step(self, steps: int | None = None) -> int | None:
        """The step of the checkpoint this trainer would resume from when it is already at or past ``steps``
        (default ``train.steps``), so training has nothing to do; else None. Reads only its ``state.json``."""
        total = self.config.train.steps if steps is None else steps
        path = self._checkpoint_to_resume()
        step = checkpoint_step(path) if path is not None else None
        return step if step is not None and step >= total else None

    def setup(self) -> None:
        config, ctx = self.config, self.ctx
        self.train_samples = load_split(config.data, config.data.train_split,
                                        config.prompts.resolved().text_processor)
        if not self.train_samples:
            raise CMoEError(f"data: the {config.data.train_split!r} split is empty; check the dataset roots")
        resume_from = self._checkpoint_to_resume()
        parts = read_checkpoint(resume_from) if resume_from is not None else None
        if parts is not None and ctx.is_main:
            note = resume_note(parts["state"], config.to_dict(), resume_from)
            if note:
                print(note, flush=True)
            self._resumed_from = (resume_from, parts["state"])
        if resume_from is not None and (resume_from / "tokenizer").is_dir():
            self.tokenizer = load_tokenizer(resume_from / "tokenizer", original=self.style.tokenizer == "original")
        else:
            self.tokenizer = make_tokenizer(config, self.train_samples)
        train = config.train
        self.fsdp = train.distributed == "fsdp" and ctx.world_size > 1
        if self.fsdp:
            # Rank 0 builds the model and loads the checkpoint; the others build it on the meta device and
            # receive their shards from rank 0.
            prepare = None if parts is None else partial(load_trainable, parts=parts, where=str(resume_from))
            model, self.fingerprint = distributed.build_sharded_model(config, self.tokenizer, ctx.device, prepare)
        else:
            torch.manual_seed(config.seed)
            model = build_model(config.model, self.tokenizer).to(ctx.device)
            self.fingerprint = frozen_fingerprint(model)
            if parts is not None:
                load_trainable(model, parts, str(resume_from))
        if ctx.is_main:  # shapes and dtypes only: a sharded model's DTensors count their full size
            print(step_memory_estimate(model, config).format(), flush=True)
        self.model: UniMedModel = model
        self.optimizer = torch.optim.AdamW(parameter_groups(model, train.weight_decay), lr=train.lr,
                                           betas=tuple(train.betas), fused=False)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: learning_rate(step, train) / train.lr if train.lr > 0 else 0.0)
        self.step = 0
        if parts is not None:
            load_optimizer = None
            if self.fsdp:
                load_optimizer = partial(distributed.load_full_optimizer_state, model, self.optimizer)
            self.step = load_training_state(parts, self.optimizer, self.scheduler, ctx.rank, load_optimizer)["step"]
        else:
            torch.manual_seed(config.seed + ctx.rank)
        self.scaler = None
        if train.precision == "fp16":
            self.scaler = distributed.FSDPGradScaler("cuda") if self.fsdp else torch.amp.GradScaler("cuda")
        self.wrapped: nn.Module = model
        if ctx.world_size > 1 and not self.fsdp:
            self.wrapped = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
        self.collator = Collator(self.tokenizer, model.vision_encoder.image_size, config.model.image_mean,
                                 config.model.image_std, config.model.max_text_tokens, style=self.style)
        options = dict(config.data.sampler_options)
        if config.data.sampler == "task_ratio":
            options.setdefault("ratios", config.data.mixing_ratios())
            if config.data.mixing_groups():
                options.setdefault("groups", config.data.mixing_groups())
        self.sampler = build_sampler(config.data.sampler, self.train_samples, train.batch_size, seed=config.seed,
                                     **options)
        self.probe, self.report = None, None
        if train.analyze_every:
            self.probe = TugOfWarProbe(self.train_samples, self.collator, train.analyze_batches_per_task,
                                       train.batch_size, seed=config.seed)
            saved = self.output_dir / REPORT_DIR / "tug_of_war.json"
            self.report = TugOfWarReport.load_json(saved) if saved.is_file() and self.step > 0 else \
                TugOfWarReport(meta=report_meta(model, config))
            self.report.steps = [entry for entry in self.report.steps if entry.step <= self.step]

    def _batches(self):
        """This rank's batches from the shared stream, resuming after the ones already consumed."""
        ctx, accum = self.ctx, self.config.train.grad_accum
        start = self.step * accum * ctx.world_size + ctx.rank
        indices = islice(self.sampler.iter_from(start), 0, None, ctx.world_size)
        # Each read of a sample is keyed by its global batch and position: a pool template drawn from that key is
        # the same in a resumed run and with any number of processes.
        keys = keyed_batches(indices, start, ctx.world_size)
        samples = DrawnInstructions(self.train_samples, self.config.seed, self.style.templates == "pools")
        # Its own generator: creating the iterator must not draw from the global RNG (dropout's), or a resumed
        # run would see shifted dropout masks.
        generator = torch.Generator().manual_seed(self.config.seed)
        loader = torch.utils.data.DataLoader(samples, batch_sampler=keys, collate_fn=self.collator,
                                             num_workers=self.config.data.num_workers, generator=generator)
        return iter(loader)

    def _log(self, record: dict[str, Any]) -> None:
        if self.ctx.is_main:
            with open(self.output_dir / METRICS_FILE, "a") as handle:
                handle.write(json.dumps(record) + "\n")
            if getattr(self, "tensorboard", None) is not None:
                self.tensorboard.log(record)

    def _trim_metrics(self) -> None:
        """Drop metric lines past the resumed step (written after the checkpoint by an interrupted run)."""
        path = self.output_dir / METRICS_FILE
        if self.ctx.is_main and path.is_file():
            lines = path.read_text(errors="replace").splitlines()
            kept = [line for line in lines if _metric_step(line) is not None and _metric_step(line) <= self.step]
            if len(kept) != len(lines):
                atomic_write(path, lambda tmp: Path(tmp).write_text("".join(line + "\n" for line in kept)))

    def save(self) -> Path | None:
        """A checkpoint of the current step (rank 0 writes; every rank's RNG state is kept)."""
        ctx = self.ctx
        states = [rng_state()]
        if ctx.world_size > 1:
            gathered: list[Any] = [None] * ctx.world_size
            dist.all_gather_object(gathered, states[0])
            states = gathered
        trainable = optimizer_state = None
        if self.fsdp:
            trainable = distributed.full_trainable_state(self.model)
            optimizer_state = distributed.full_optimizer_state(self.model, self.optimizer)
        path = None
        if ctx.is_main:
            extra = {"config": self.config.to_dict(), "world_size": ctx.world_size,
                     "original_run": run_record(self.config, self.tokenizer)}
            path = save_checkpoint(self.output_dir, self.step, self.model, self.optimizer, self.scheduler, extra,
                                   keep=self.config.train.keep_checkpoints, tokenizer=self.tokenizer,
                                   rng_states=states, trainable=trainable, optimizer_state=optimizer_state,
                                   fingerprint=self.fingerprint)
        if ctx.world_size > 1:
            dist.barrier()
        return path

    def _analyze(self, plots: bool) -> None:
        """One tug-of-war measurement at the current step (every rank measures; rank 0 writes). The JSON is
        rewritten every time; the plots (most of the cost: about half a second each) only when `plots`, at
        checkpoints and at the end of `train`."""
        self.probe.measure(self.model, self.step, self.report, self.ctx.device,
                           autocast(self.config.train.precision, self.ctx.device))
        if self.ctx.is_main:
            write_report(self.report, self.output_dir / REPORT_DIR, plots=plots)

    def train(self, steps: int | None = None) -> TrainResult:
        """Train until step ``steps`` (default ``train.steps``); returns the last checkpoint and the metrics. A run
        already at that step returns at once, without building the model: its checkpoint and no history."""
        from tqdm.auto import tqdm

        config, ctx, train = self.config, self.ctx, self.config.train
        total = train.steps if steps is None else steps
        if not hasattr(self, "model"):
            finished = self.finished_step(total)
            if finished is not None:
                return TrainResult(self.output_dir, finished, self._checkpoint_to_resume(), [])
            self.setup()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._trim_metrics()
        if ctx.is_main and getattr(self, "_resumed_from", None) is not None:
            print(resuming_line(*self._resumed_from, self.output_dir, train, total), flush=True)
        self.tensorboard = TensorBoardLog(self.output_dir) if ctx.is_main else None
        if ctx.is_main:
            write_json(self.output_dir / "config.json", config.to_dict())
            if self.step == 0:
                save_connector_init(self.output_dir, self.model.connector)
        # auto's backend choices live in the run folder, one file per rank, so a resumed run computes with the same
        # backends.
        with choices_recorded_in(self.output_dir / auto_choices_file(ctx.rank), mode=train.backend_choice):
            batches = self._batches()
            history: list[dict[str, Any]] = []
            checkpoint = None
            self.wrapped.train()
            window, started = _Window(), time.perf_counter()
            bar = tqdm(total=total, initial=self.step, disable=not (ctx.is_main and train.progress), desc="train")
            if self.probe is not None and self.step == 0:
                self._analyze(plots=total == 0)
            while self.step < total:
                grad_norm = self._optimizer_step(batches, window)
                self.step += 1
                bar.update(1)
                if self.step % train.log_every == 0 or self.step == total:
                    record = window.record(self.step, self.scheduler.get_last_lr()[0],
                                           time.perf_counter() - started, grad_norm)
                    history.append(record)
                    self._log(record)
                    bar.set_postfix(loss=f"{record['loss']:.3f}")
                    window, started = _Window(), time.perf_counter()
                at_checkpoint = self.step % train.save_every == 0 or self.step == total
                if self.probe is not None and (self.step % train.analyze_every == 0 or self.step == total):
                    self._analyze(plots=at_checkpoint)
                if at_checkpoint:
                    checkpoint = self.save() or checkpoint
                    self._plot_curves()
            bar.close()
            if self.tensorboard is not None:
                self.tensorboard.close()
        return TrainResult(self.output_dir, self.step, checkpoint, history)

    def _plot_curves(self) -> None:
        """Rank 0 redraws the loss and per-task loss PNGs from the whole metrics.jsonl (`curves.plot_curves`)."""
        if self.ctx.is_main:
            plot_curves(self.output_dir / METRICS_FILE, self.output_dir / CURVES_DIR)

    def _optimizer_step(self, batches, window: _Window) -> float | None:
        train, ctx = self.config.train, self.ctx
        for micro in range(train.grad_accum):
            batch = next(batches).to(ctx.device)
            last = micro == train.grad_accum - 1
            if last or ctx.world_size == 1:
                sync = nullcontext()
            else:
                sync = distributed.no_sync(self.model) if self.fsdp else self.wrapped.no_sync()
            with sync:
                with autocast(train.precision, ctx.device):
                    out = self.wrapped(batch)
                loss = out.loss / train.grad_accum
                (self.scaler.scale(loss) if self.scaler else loss).backward()
            image_tasks = [s.task for s, t in zip(batch.samples, batch.texts) if t.has_image]
            window.add(batch.tasks, image_tasks, out, float(out.loss.detach()))
        grad_norm = None
        if self.fsdp:
            distributed.sync_replicated_grads(self.model)
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if train.max_grad_norm is not None:
            params = [p for group in self.optimizer.param_groups for p in group["params"]]
            clip = distributed.clip_grad_norm_ if self.fsdp else torch.nn.utils.clip_grad_norm_
            grad_norm = float(clip(params, train.max_grad_norm))
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm
