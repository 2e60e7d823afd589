"""The tug-of-war analysis of a Uni-Med model: per-task connector gradients, routing and parameter statistics
on fixed probe batches, for a checkpoint (`analyze_checkpoint`, ``cmoe unimed analyze``) or live during
training every N steps (`TugOfWarProbe`, ``train.analyze_every``). The indexes are in `measures`, the report in
`report` and the plots in `plots`.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from cmoe.errors import CMoEError
from cmoe.reference_models.unimed.analysis.gradients import per_task_group_gradients
from cmoe.reference_models.unimed.analysis.measures import parameter_stats, routing_by_task, snapshot_parameters
from cmoe.reference_models.unimed.analysis.plots import write_report
from cmoe.reference_models.unimed.analysis.report import TugOfWarReport, TugOfWarStep
from cmoe.reference_models.unimed.config import RecipeConfig
from cmoe.reference_models.unimed.data.sample import Sample
from cmoe.reference_models.unimed.model.assembly import UniMedModel, build_model
from cmoe.reference_models.unimed.model.checkpoint import load_connector_init
from cmoe.reference_models.unimed.model.collate import IMAGE_TASKS, Batch, Collator

REPORT_DIR = "tug_of_war"


class TugOfWarProbe:
    """Fixed batches of each image task (a seeded pick from `samples`) and the measurement on them.

    QA never reaches the connector, so it has no connector gradient and is left out. Each measurement runs the
    model in eval mode (no dropout noise), takes each task's mean loss gradient on the connector's parameter
    groups, the routing weights per task, and the parameter statistics with the update since the previous
    measurement (or since `reference_state`, e.g. the initialisation).
    """

    def __init__(self, samples: list[Sample], collator: Collator, batches_per_task: int = 2, batch_size: int = 8,
                 seed: int = 0, tasks: tuple[str, ...] = IMAGE_TASKS):
        rng = np.random.default_rng(seed)
        self.batches: dict[str, list[Batch]] = {}
        for task in tasks:
            pool = [s for s in samples if s.task == task]
            if not pool:
                continue
            picked = [pool[i] for i in rng.permutation(len(pool))[:batches_per_task * batch_size]]
            self.batches[task] = [collator(picked[i:i + batch_size]) for i in range(0, len(picked), batch_size)]
        if len(self.batches) < 2:
            raise CMoEError(f"tug-of-war probe: expected entries of at least two image tasks, got "
                            f"{sorted(self.batches)}; the analysis compares tasks' gradients")
        self.previous_state: dict[str, torch.Tensor] | None = None

    def measure(self, model: UniMedModel, step: int, report: TugOfWarReport,
                device: torch.device | str = "cpu", autocast=None) -> TugOfWarStep:
        """Record one step of `report` for `model` (its mode and gradients are left as they were)."""
        connector = model.connector
        was_training = model.training
        model.eval()
        task_grads: dict[str, dict[str, torch.Tensor]] = {}
        weights, labels = [], []
        try:
            for task, batches in self.batches.items():
                total: dict[str, torch.Tensor] = {}
                for batch in batches:
                    with autocast or nullcontext():
                        out = model(batch.to(device))
                    grads = per_task_group_gradients(connector, {task: out.loss}, retain_graph=False)[task]
                    for group, grad in grads.items():
                        total[group] = total.get(group, 0) + grad / len(batches)
                    if out.routing_weights is not None:
                        weights.append(out.routing_weights.detach().float().cpu())
                        labels.extend([task] * out.routing_weights.shape[0])
                task_grads[task] = total
        finally:
            model.train(was_training)
        routing = routing_by_task(torch.cat(weights), labels) if weights else None
        stats = parameter_stats(connector, self.previous_state)
        self.previous_state = snapshot_parameters(connector)
        return report.record(step, task_grads, routing, stats)


def report_meta(model: UniMedModel, config: RecipeConfig) -> dict:
    connector = model.connector.config
    return {"connector": config.model.connector.preset, "connector_type": connector.connector_type,
            "num_experts": getattr(connector, "num_experts", None), "router": getattr(connector, "router", None),
            "run": config.name}


def analyze_checkpoint(config: RecipeConfig, checkpoint: str | os.PathLike | None = None,
                       out_dir: str | os.PathLike | None = None, batches_per_task: int = 2,
                       device: torch.device | str | None = None) -> tuple[TugOfWarReport, list[Path]]:
    """Measure a checkpoint on probe batches from the training split; the parameter updates are relative to
    the connector's initialisation, read from the run's ``connector_init.safetensors`` (written by the trainer
    before its first step). Runs without that file get it by rebuilding the model from the seed (the init
    draws from the same RNG stream as the frozen weights, so the whole model is built once more). Writes the
    JSON and plots to `out_dir` (default ``output_dir/tug_of_war_<step>``)."""
    from cmoe.reference_models.unimed.data.splits import load_split
    from cmoe.reference_models.unimed.evaluation.evaluate import load_checkpoint_model

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    path, model, step = load_checkpoint_model(config, checkpoint, device)
    initial_state = load_connector_init(path.parent)
    if initial_state is None:
        torch.manual_seed(config.seed)
        initial_state = snapshot_parameters(build_model(config.model, model.tokenizer).connector)
    samples = load_split(config.data, config.data.train_split, config.prompts.resolved().text_processor)
    collator = Collator(model.tokenizer, model.vision_encoder.image_size, config.model.image_mean,
                        config.model.image_std, config.model.max_text_tokens, style=config.prompts.resolved())
    probe = TugOfWarProbe(samples, collator, batches_per_task, config.train.batch_size, seed=config.seed)
    probe.previous_state = initial_state
    report = TugOfWarReport(meta=report_meta(model, config))
    probe.measure(model, step, report, device)
    target = Path(out_dir) if out_dir is not None else Path(config.output_dir) / f"{REPORT_DIR}_{step}"
    return report, write_report(report, target)

