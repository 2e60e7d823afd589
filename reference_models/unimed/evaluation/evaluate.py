"""Evaluation of every task: greedy answers → scores → a Markdown and a JSON table (plus every prediction, for
inspection). Two scoring protocols (``eval.protocol``, ``--protocol``): ``original`` scores each dataset as the
original Uni-Med code does (`original_protocol`, one row per task/dataset), ``cmoe`` pools each task's datasets
and scores them with `metrics.evaluate_task` (smoothed BLEU, SQuAD F1, lenient box parsing; one row per task).
Both tables say which protocol made them."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from cmoe.errors import CMoEError
from cmoe.io import atomic_write, write_json
from cmoe.reference_models.unimed.config import EVAL_PROTOCOLS, RecipeConfig
from cmoe.reference_models.unimed.data.splits import by_task, load_split
from cmoe.reference_models.unimed.evaluation.metrics import Metric, evaluate_task
from cmoe.reference_models.unimed.evaluation.original_protocol import evaluate_dataset
from cmoe.reference_models.unimed.model.assembly import UniMedModel, build_model
from cmoe.reference_models.unimed.model.checkpoint import (
    latest_pointer,
    load_trainable,
    read_checkpoint,
    read_latest,
)
from cmoe.reference_models.unimed.model.collate import Collator
from cmoe.reference_models.unimed.model.tokenizer import load_tokenizer
from cmoe.reference_models.unimed.original import ORIGINAL_EVAL_DATASETS
from cmoe.reference_models.unimed.prompt_style import format_record, run_record
from cmoe.reference_models.unimed.tasks import TASKS

TASK_ORDER = tuple(TASKS)
PROTOCOL_DESCRIPTIONS = {
    "original": "the original Uni-Med code's scoring, one row per task/dataset (unsmoothed BLEU, its F1, the rouge "
                "package, strict box parsing and pixel IoU)",
    "cmoe": "cmoe's scoring, one row per task with its datasets pooled (smoothed BLEU, SQuAD-style F1, "
            "rouge-score with stemming, lenient box parsing)",
}


def check_protocol(protocol: str) -> str:
    """`protocol` if it is ``original`` or ``cmoe``, else a `CMoEError` naming both."""
    if protocol not in EVAL_PROTOCOLS:
        raise CMoEError(f"protocol: expected one of {', '.join(EVAL_PROTOCOLS)} (original: the original code's "
                        f"numbers, per dataset; cmoe: ours, per task), got {protocol!r}")
    return protocol


def load_checkpoint_model(config: RecipeConfig, checkpoint: str | os.PathLike | None,
                          device: torch.device | str = "cpu") -> tuple[Path, UniMedModel, int]:
    """``(checkpoint, model, step)``: `load_trained_model` of `checkpoint`, or of the run's latest when None (read
    from the new latest if the training run prunes it meanwhile, `read_latest`)."""
    if checkpoint is not None:
        return Path(checkpoint), *load_trained_model(config, checkpoint, device)
    path, (model, step) = read_latest(config.output_dir, lambda found: load_trained_model(config, found, device))
    return path, model, step


def load_trained_model(config: RecipeConfig, checkpoint: str | os.PathLike | None,
                       device: torch.device | str = "cpu") -> tuple[UniMedModel, int]:
    """The model of `config` with a checkpoint's trainable weights (``None``: the run's ``latest``, as
    `load_checkpoint_model` reads it), and the step the checkpoint was written at."""
    if checkpoint is None:
        return load_checkpoint_model(config, None, device)[1:]
    path = Path(checkpoint)
    parts = read_checkpoint(path)
    tokenizer_dir = path / "tokenizer"
    original = config.prompts.resolved().tokenizer == "original"
    if tokenizer_dir.is_dir():
        tokenizer = load_tokenizer(tokenizer_dir, original)
    elif config.model.tokenizer.kind == "pretrained":
        tokenizer = load_tokenizer(config.model.tokenizer.path, original)
    else:
        raise CMoEError(f"checkpoint {path}: no tokenizer/ folder, and the config's word-level tokenizer is "
                        "built at training time; evaluate a checkpoint written by `cmoe unimed train`")
    torch.manual_seed(config.seed)
    model = build_model(config.model, tokenizer)
    load_trainable(model, parts, str(path))
    return model.to(device).eval(), int(parts["state"]["step"])


def predict(model: UniMedModel, samples: list, config: RecipeConfig, device: torch.device | str = "cpu") -> list[str]:
    """Greedy answers for `samples`, in batches of ``eval.batch_size``, asked and read as ``prompts`` says."""
    style = config.prompts.resolved()
    collator = Collator(model.tokenizer, model.vision_encoder.image_size, config.model.image_mean,
                        config.model.image_std, config.model.max_text_tokens, with_answers=False, style=style)
    answers: list[str] = []
    size = config.eval.batch_size
    for start in range(0, len(samples), size):
        batch = collator(samples[start:start + size]).to(device)
        answers.extend(model.generate(batch, config.eval.max_new_tokens, style))
    return answers


def _rows(task: str, group: list, protocol: str, limit: int | None) -> list[tuple[str, list]]:
    """The table rows of one task: the task (``cmoe``) or one per dataset, ``task/source`` (``original``); each
    cut to `limit` entries."""
    if protocol == "cmoe":
        return [(task, group[:limit] if limit is not None else group)]
    sources: dict[str, list] = {}
    for sample in group:
        sources.setdefault(sample.source, []).append(sample)
    return [(f"{task}/{source}", items[:limit] if limit is not None else items) for source, items in sources.items()]


def evaluate_model(model: UniMedModel, samples: list, config: RecipeConfig, limit_per_task: int | None = None,
                   device: torch.device | str = "cpu", protocol: str | None = None
                   ) -> tuple[dict[str, dict[str, Metric]], list[dict[str, Any]]]:
    """Metrics per row and the predictions (task, source, prompt fields, reference, prediction) of `samples`.

    `protocol` (default ``eval.protocol``): ``cmoe`` gives one row per task, its datasets pooled, at most
    `limit_per_task` entries each; ``original`` one row per task and dataset (``vqa/slake_vqa``), scored as the
    original code does, the limit applying to each dataset.
    """
    protocol = check_protocol(protocol or config.eval.protocol)
    limit = limit_per_task if limit_per_task is not None else config.eval.limit_per_task
    results: dict[str, dict[str, Metric]] = {}
    records: list[dict[str, Any]] = []
    groups = by_task(samples)
    for task in [t for t in TASK_ORDER if t in groups]:
        for row, group in _rows(task, groups[task], protocol, limit):
            predictions = predict(model, group, config, device)
            score = evaluate_task if protocol == "cmoe" else evaluate_dataset
            results[row] = score(task, predictions, [s.answer for s in group], [s.meta for s in group],
                                 coco=config.eval.coco_caption)
            records.extend({"task": task, "source": s.source, "image": _image_name(s), "fields": s.fields,
                            "reference": s.answer, "prediction": p} for s, p in zip(group, predictions))
    return results, records


def _image_name(sample) -> str | None:
    """How predictions.jsonl names a sample's image: its file, else its image id (generated images)."""
    if isinstance(sample.image, (str, os.PathLike)):
        return str(sample.image)
    return sample.image_id


def protocol_line(protocol: str, rows: Any = ()) -> str:
    """The line a table starts with: which scoring protocol made it, and the original's names of the datasets
    among `rows` (``task/dataset`` keys) under ``original``."""
    line = f"Scoring protocol: {check_protocol(protocol)}: {PROTOCOL_DESCRIPTIONS[protocol]}."
    names = [f"{row} = {ORIGINAL_EVAL_DATASETS[row.split('/', 1)[1]]}" for row in rows
             if "/" in row and row.split("/", 1)[1] in ORIGINAL_EVAL_DATASETS]
    return line + (f" The original's dataset names: {', '.join(names)}." if names else "")


def format_results(results: dict[str, dict[str, Metric]], protocol: str | None = None) -> str:
    """A Markdown table: one row per (task or task/dataset, metric), values in percent, unavailable metrics with
    their reason; headed by `protocol_line` when `protocol` is given."""
    head = [protocol_line(protocol, results), ""] if protocol is not None else []
    lines = [*head, f"| {'task/dataset' if protocol == 'original' else 'task'} | metric | value | n |",
             "|---|---|---:|---:|"]
    for task, metrics in results.items():
        for name, metric in metrics.items():
            value = f"{100 * metric.value:.2f}" if metric.value is not None else f"n/a ({metric.note})"
            lines.append(f"| {task} | {name} | {value} | {metric.count} |")
    return "\n".join(lines)


HEADLINE = {
    "qa": [("accuracy", "all/accuracy")],
    "vqa": [("closed acc", "closed/accuracy"), ("open F1", "open/f1"), ("BLEU-1", "all/bleu1")],
    "report": [("BLEU-4", "bleu4"), ("ROUGE-L", "rougeL"), ("METEOR", "meteor"), ("CIDEr", "cider")],
    "rec": [("mIoU", "miou"), ("Acc@0.5", "acc@0.5")],
    "reg": [("accuracy", "accuracy"), ("F1", "f1")],
    "cls": [("accuracy", "accuracy")],
}
"""The metrics a one-line-per-task summary shows (the full table has them all)."""


def summary_table(results: dict[str, dict[str, Metric]]) -> str:
    """One Markdown row per task (or task/dataset) with its headline metrics in percent; an unavailable one shows
    n/a, and why (e.g. how to get the Java runtime the caption metrics need) is said once under the table."""
    lines = ["| task | n | headline metrics (%) |", "|---|---:|---|"]
    notes: dict[str, list[str]] = {}
    for task, metrics in results.items():
        shown = []
        for label, key in HEADLINE.get(task.split("/")[0], []):
            metric = metrics.get(key)
            if metric is not None:
                shown.append(f"{label} {100 * metric.value:.1f}" if metric.value is not None else f"{label} n/a")
                if metric.value is None and metric.note:
                    notes.setdefault(metric.note, []).append(f"{task} {label}")
        count = max((m.count for m in metrics.values()), default=0)
        lines.append(f"| {task} | {count} | {', '.join(shown)} |")
    lines += [f"\nn/a ({', '.join(where)}): {note}" for note, where in notes.items()]
    return "\n".join(lines)


def results_to_dict(results: dict[str, dict[str, Metric]]) -> dict[str, dict[str, Any]]:
    return {task: {name: {"value": m.value, "count": m.count, "note": m.note} for name, m in metrics.items()}
            for task, metrics in results.items()}


def write_results(out_dir: str | os.PathLike, results: dict[str, dict[str, Metric]],
                  records: list[dict[str, Any]], header: str = "", protocol: str = "cmoe",
                  run: dict[str, Any] | None = None, checkpoint: dict[str, Any] | None = None) -> list[Path]:
    """``eval.md``, ``eval.json`` and ``predictions.jsonl`` in `out_dir`, each written atomically; both tables
    name the scoring `protocol` (eval.json: a ``"protocol"`` key beside one key per row) and, when given, what
    the `run` reproduces of the original's (`prompt_style.run_record`; eval.json: ``"original_run"``), and the
    `checkpoint` scored (eval.json: ``"checkpoint"``: path, step and a fallback note)."""
    out = Path(out_dir)
    run_line = format_record(run) + "\n\n" if run else ""
    table = (header + "\n\n" if header else "") + run_line + format_results(results, protocol) + "\n"
    lines = "".join(json.dumps(record) + "\n" for record in records)
    payload = {"protocol": protocol, **({"checkpoint": checkpoint} if checkpoint else {}),
               **({"original_run": run} if run else {}), **results_to_dict(results)}
    return [atomic_write(out / "eval.md", lambda p: Path(p).write_text(table)),
            write_json(out / "eval.json", payload),
            atomic_write(out / "predictions.jsonl", lambda p: Path(p).write_text(lines))]


class EvaluationResults(dict):
    """The metrics per row (a dict, as `evaluate_model` gives them) and where they were written: `path` (the
    folder holding ``eval.md``, ``eval.json``, ``predictions.jsonl``), the `checkpoint` scored and its `step`."""

    path: Path
    checkpoint: Path
    step: int


def evaluation_dir(config: RecipeConfig, checkpoint: Path, protocol: str) -> Path:
    """Where `run_evaluation` writes by default: ``<output_dir>/eval/<checkpoint folder>-<protocol>/``, so tables
    of other checkpoints or protocols never overwrite each other."""
    return Path(config.output_dir) / "eval" / f"{checkpoint.name}-{protocol}"


def _fallback_note(config: RecipeConfig, checkpoint: Path) -> str | None:
    """A line saying the run's ``latest`` names another checkpoint than the one scored (it was incomplete or
    damaged, so the newest one that verifies was taken); None when it names this one."""
    named = latest_pointer(Path(config.output_dir))
    if named is not None and named.name != checkpoint.name:
        return (f"Note: {Path(config.output_dir) / 'latest'} names {named.name}, which is incomplete or damaged; "
                f"scored {checkpoint.name}, the newest checkpoint that verifies.")
    return None


def run_evaluation(config: RecipeConfig, checkpoint: str | os.PathLike | None = None,
                   out_dir: str | os.PathLike | None = None, limit_per_task: int | None = None,
                   device: torch.device | str | None = None, protocol: str | None = None) -> EvaluationResults:
    """Evaluate a checkpoint (default: the run's latest that verifies) on the config's eval split, scored by
    `protocol` (default ``eval.protocol``; see `evaluate_model`), and write the tables to `out_dir` (default
    `evaluation_dir`). The tables name the checkpoint, its step and, when ``latest`` named another one, why."""
    protocol = check_protocol(protocol or config.eval.protocol)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    path, model, step = load_checkpoint_model(config, checkpoint, device)
    samples = load_split(config.data, config.data.eval_split, config.prompts.resolved().text_processor)
    if not samples:
        raise CMoEError(f"data: the {config.data.eval_split!r} split is empty; check the dataset roots")
    results, records = evaluate_model(model, samples, config, limit_per_task, device, protocol)
    target = Path(out_dir) if out_dir is not None else evaluation_dir(config, path, protocol)
    note = _fallback_note(config, path) if checkpoint is None else None
    header = "\n\n".join([f"# {config.name}: evaluation on {config.data.eval_split}",
                           f"Checkpoint: {path} (step {step}).", *([note] if note else [])])
    write_results(target, results, records, header=header, protocol=protocol,
                  run=run_record(config, getattr(model, "tokenizer", None)),
                  checkpoint={"path": str(path), "step": step, **({"note": note} if note else {})})
    evaluation = EvaluationResults(results)
    evaluation.path, evaluation.checkpoint, evaluation.step = target, path, step
    return evaluation
