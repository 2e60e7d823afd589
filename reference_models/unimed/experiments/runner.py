"""Controlled comparisons of recipe variants (connectors, data densities, samplers) over several seeds.

An experiment file names a base config, shared overrides, the variants (each a set of overrides) and the
seeds. Every (variant, seed) run trains with the same budget, is evaluated, and (with ``train.analyze_every``)
measures the tug-of-war; the results are aggregated into a Markdown table (mean ± std over seeds, per task
and averaged), a JSON file and comparison plots. Runs resume, so an interrupted experiment continues.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cmoe.errors import CMoEError, expect
from cmoe.io import atomic_write, write_json
from cmoe.reference_models.unimed.config import BUILTIN_CONFIGS, CONFIG_DIR, load_config, merge_overrides
from cmoe.reference_models.unimed.data.synthetic import IMAGE_TASKS
from cmoe.reference_models.unimed.evaluation.metrics import Metric
from cmoe.reference_models.unimed.experiments.stats import mean_std, paired_test

TASK_SCORE = {"qa": "all/accuracy", "vqa": "all/f1", "report": "rougeL", "rec": "miou", "reg": "accuracy",
              "cls": "accuracy"}
"""The one number per task that the average is taken over (all in 0–1, higher is better). Under
``eval.protocol: original`` a task has one row per dataset (``vqa/slake_vqa``): its number is the unweighted mean
of its datasets' (None where none has one, e.g. text QA, which the original does not score)."""

BUILTIN_EXPERIMENTS = {"cmoe_vs_mlp": "experiment_cmoe_vs_mlp.yaml", "imax": "experiment_imax.yaml",
                       "paper": "experiment_paper.yaml", "tug_of_war": "experiment_tug_of_war.yaml"}


@dataclass
class ExperimentSpec:
    """An experiment file: a base config, shared overrides, the variants and seeds; optionally the
    `baselines` every other variant is tested against (paired by seed), a `task_study` (one variant trained
    on nested subsets of the image tasks and on each image task alone), and the `router_variant` template that
    turns a registered router name into a variant (``--variants my_router``)."""

    name: str
    base: str
    variants: dict[str, dict[str, Any]]
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    overrides: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    baselines: list[str] = field(default_factory=list)
    task_study: dict[str, Any] | None = None
    router_variant: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_ROUTER_VARIANT))


DEFAULT_ROUTER_VARIANT: dict[str, Any] = {"model": {"connector": {"preset": "task", "options": {}}}}
"""A registered router as a variant: the ``task`` preset's 5 MLP experts with that router (``{router}``)."""

_TASK_STUDY_KEYS = {"variant", "nested", "single_task"}


def load_experiment(name_or_path: str | os.PathLike) -> ExperimentSpec:
    """An experiment file (YAML: name, base, overrides, variants, seeds, baselines, task_study, router_variant)
    or a built-in one by name."""
    import yaml

    path = CONFIG_DIR / BUILTIN_EXPERIMENTS[str(name_or_path)] if str(name_or_path) in BUILTIN_EXPERIMENTS \
        else Path(name_or_path)
    if not path.is_file():
        raise CMoEError(f"experiment: {str(name_or_path)!r} is neither a file nor a built-in experiment; "
                        f"built-in: {', '.join(sorted(BUILTIN_EXPERIMENTS))}")
    data = yaml.safe_load(path.read_text()) or {}
    known = {"name", "base", "variants", "seeds", "overrides", "description", "baselines", "task_study",
             "router_variant"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise CMoEError(f"experiment {path}: unknown key(s) {unknown}; known keys: {sorted(known)}")
    expect(isinstance(data.get("variants"), dict) and data["variants"], f"experiment {path}: variants",
           "a non-empty mapping of variant name → config overrides", data.get("variants"))
    variants = {k: v or {} for k, v in data["variants"].items()}
    baselines = list(data.get("baselines") or [])
    missing = sorted(set(baselines) - set(variants))
    if missing:
        raise CMoEError(f"experiment {path}: baselines {missing} are not variants; variants: {sorted(variants)}")
    study = data.get("task_study")
    if study is not None:
        expect(isinstance(study, dict) and set(study) <= _TASK_STUDY_KEYS and study.get("variant") in variants
               and isinstance(study.get("nested", []), list), f"experiment {path}: task_study",
               f"a mapping with keys {sorted(_TASK_STUDY_KEYS)}, `variant` one of {sorted(variants)}", study)
        bad = sorted(set(study.get("nested", [])) - set(IMAGE_TASKS))
        if bad:
            raise CMoEError(f"experiment {path}: task_study.nested: {bad} are not image tasks; "
                            f"image tasks: {list(IMAGE_TASKS)}")
    base = str(data.get("base", "tiny"))
    if base not in BUILTIN_CONFIGS and not Path(base).is_absolute():
        base = str(path.parent / base)
    return ExperimentSpec(name=data.get("name", path.stem), base=base, variants=variants,
                          seeds=list(data.get("seeds", [0, 1, 2])), overrides=data.get("overrides") or {},
                          description=data.get("description", ""), baselines=baselines, task_study=study,
                          router_variant=data.get("router_variant") or dict(DEFAULT_ROUTER_VARIANT))


def resolve_variants(spec: ExperimentSpec, names: list[str] | None) -> list[str]:
    """The variants to run: all of the spec's, or `names`; a name that is not a variant but a registered
    router becomes one (the spec's `router_variant` with that router), so a plugin's router runs on the same
    testbed. Anything else is an error listing both."""
    from cmoe.registry import ROUTERS

    if names is None:
        return list(spec.variants)
    unknown = []
    for name in names:
        if name in spec.variants:
            continue
        if name in ROUTERS.names():
            spec.variants[name] = _layer(spec.router_variant,
                                         {"model": {"connector": {"options": {"router": name}}}})
        else:
            unknown.append(name)
    if unknown:
        raise CMoEError(f"variants {unknown} are not in experiment {spec.name!r} and are not registered routers; "
                        f"variants: {sorted(spec.variants)}; routers: {sorted(ROUTERS.names())}")
    return list(names)


def _layer(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Overrides layered on overrides (``_replace`` marks kept for the final merge into the config)."""
    return merge_overrides(base, overrides, keep_marks=True)


def run_config(spec: ExperimentSpec, variant: str, seed: int, out_dir: Path, overrides: dict[str, Any] | None = None,
               *, run_dir: Path | None = None, extra: dict[str, Any] | None = None):
    """The recipe config of one (variant, seed) run (in `run_dir`, by default ``out_dir/variant/seedN``)."""
    merged = _layer(_layer(_layer(spec.overrides, spec.variants[variant]), overrides or {}), extra or {})
    run_dir = run_dir or out_dir / variant / f"seed{seed}"
    merged = _layer(merged, {"seed": seed, "name": f"{spec.name}/{run_dir.relative_to(out_dir)}",
                             "output_dir": str(run_dir)})
    return load_config(spec.base, merged)


def _task_rows(results: dict[str, dict[str, Metric]], task: str) -> list[dict[str, Metric]]:
    """The rows of `task`: ``task`` itself (``cmoe`` protocol) or its ``task/<dataset>`` rows (``original``)."""
    return [metrics for row, metrics in results.items() if row.split("/")[0] == task]


def _score(results: dict[str, dict[str, Metric]], task: str) -> float | None:
    metrics = [row.get(TASK_SCORE[task]) for row in _task_rows(results, task)]
    values = [metric.value for metric in metrics if metric is not None and metric.value is not None]
    return statistics.fmean(values) if values else None


def _tug_summary(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / "tug_of_war" / "tug_of_war.json"
    if not path.is_file():
        return None
    steps = json.loads(path.read_text())["steps"]
    group = "all"
    conflict = [s["gradients"][group]["direction"]["conflict"] for s in steps if group in s["gradients"]]
    cv = [s["gradients"][group]["magnitude"]["cv"] for s in steps if group in s["gradients"]]
    valid = lambda xs: [x for x in xs if x is not None]
    summary: dict[str, Any] = {
        "conflict_mean": statistics.fmean(valid(conflict)) if valid(conflict) else None,
        "cv_mean": statistics.fmean(valid(cv)) if valid(cv) else None,
        "conflict_final": conflict[-1] if conflict else None, "cv_final": cv[-1] if cv else None,
        "conflict_curve": [[s["step"], s["gradients"][group]["direction"]["conflict"]]
                           for s in steps if group in s["gradients"]]}
    if steps and steps[-1].get("routing"):
        routing = steps[-1]["routing"]
        summary["routing_entropy"] = statistics.fmean(r["normalized_entropy"] for r in routing.values())
        summary["routing"] = {task: {"weights": r["mean_weight"], "normalized_entropy": r["normalized_entropy"]}
                              for task, r in routing.items()}
    return summary


RUN_RECORD = "experiment_run.json"
"""Written into a run's folder once it is trained and evaluated: a finished run is reused, not redone."""


def run_one(config, seed: int) -> dict[str, Any]:
    """Train (resuming), evaluate and summarise one run; reuse its record when the same config finished."""
    from cmoe.reference_models.unimed.evaluation.evaluate import results_to_dict, run_evaluation
    from cmoe.reference_models.unimed.training.train import Trainer

    run_dir = Path(config.output_dir)
    record_path = run_dir / RUN_RECORD
    wanted = config.to_dict()
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        if record.get("config") == wanted:
            return record
        _refuse_other_config(run_dir, record.get("config"), wanted)
    if (run_dir / "config.json").is_file():  # an interrupted run: resume it only if it is this config's
        _refuse_other_config(run_dir, json.loads((run_dir / "config.json").read_text()), wanted)
    Trainer(config, resume="auto").train()
    results = run_evaluation(config)
    record = {"seed": seed, "scores": {t: _score(results, t) for t in TASK_SCORE if _task_rows(results, t)},
              "metrics": results_to_dict(results), "tug_of_war": _tug_summary(run_dir),
              "connector_params": _trainable_connector_params(run_dir), "config": config.to_dict()}
    write_json(record_path, record)
    return record


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in _flat(item, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): value}


def _refuse_other_config(run_dir: Path, found: Any, wanted: dict[str, Any]) -> None:
    """A run folder holding another config's run is never resumed or reused under this one."""
    if found == wanted:
        return
    have, want = _flat(found or {}), _flat(wanted)
    keys = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
    raise CMoEError(f"experiment: {run_dir} holds a run of another config (differs in {keys[:6]}); remove that "
                    "folder or run the experiment into another --output-dir")


def run_experiment(spec: ExperimentSpec, out_dir: str | os.PathLike, overrides: dict[str, Any] | None = None,
                   variants: list[str] | None = None) -> dict[str, Any]:
    """Train, evaluate and analyse every (variant, seed), and the task study; write ``results.json``,
    ``results.md`` and the plots. Finished runs are reused, an interrupted one resumes."""
    from cmoe.reference_models.unimed.experiments.report import format_experiment, plot_experiment
    from cmoe.reference_models.unimed.experiments.task_study import run_task_study

    out = Path(out_dir)
    chosen = resolve_variants(spec, variants)
    runs: dict[str, list[dict[str, Any]]] = {}
    for variant in chosen:
        for seed in spec.seeds:
            record = run_one(run_config(spec, variant, seed, out, overrides), seed)
            runs.setdefault(variant, []).append({k: v for k, v in record.items() if k != "config"})
    summary: dict[str, Any] = {"name": spec.name, "description": spec.description, "seeds": spec.seeds,
                               "runs": runs, "aggregate": aggregate(runs),
                               "comparisons": compare(runs, [b for b in spec.baselines if b in runs])}
    if spec.task_study and spec.task_study["variant"] in runs:
        summary["task_study"] = run_task_study(spec, out, overrides, runs[spec.task_study["variant"]])
    write_json(out / "results.json", summary)
    table = format_experiment(summary)
    atomic_write(out / "results.md", lambda p: Path(p).write_text(table))
    plot_experiment(summary, out)
    return summary


def _trainable_connector_params(run_dir: Path) -> int | None:
    from safetensors import safe_open

    from cmoe.reference_models.unimed.model.checkpoint import find_latest

    latest = find_latest(run_dir)
    if latest is None:
        return None
    with safe_open(str(latest / "trainable.safetensors"), "pt") as handle:
        return sum(math.prod(handle.get_slice(k).get_shape()) for k in handle.keys() if k.startswith("connector."))


def run_average(run: dict[str, Any]) -> float:
    """A run's score averaged over its tasks."""
    return statistics.fmean(v for v in run["scores"].values() if v is not None)


def aggregate(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Mean and sample std over seeds of each task's score, the task average, and the tug-of-war summaries."""
    result: dict[str, Any] = {}
    for variant, seeds in runs.items():
        tasks = sorted({t for run in seeds for t in run["scores"]}, key=list(TASK_SCORE).index)
        per_task = {t: mean_std([run["scores"].get(t) for run in seeds]) for t in tasks}
        tug_keys = sorted({k for run in seeds if run["tug_of_war"] for k, v in run["tug_of_war"].items()
                           if isinstance(v, (int, float)) or v is None})
        tug = {k: mean_std([run["tug_of_war"].get(k) if run["tug_of_war"] else None for run in seeds])
               for k in tug_keys}
        result[variant] = {"tasks": per_task, "average": mean_std([run_average(run) for run in seeds]),
                           "tug_of_war": tug, "connector_params": seeds[0].get("connector_params")}
    return result


def _paired(runs_a: list[dict[str, Any]], runs_b: list[dict[str, Any]], value) -> dict[str, Any] | None:
    """The paired test of `value(run)` over the seeds both variants ran (None when under 2 pairs)."""
    by_seed = {run["seed"]: run for run in runs_b}
    pairs = [(value(run), value(by_seed[run["seed"]])) for run in runs_a if run["seed"] in by_seed]
    pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
    if len(pairs) < 2:
        return None
    return paired_test([a for a, _ in pairs], [b for _, b in pairs]).to_dict()


def compare(runs: dict[str, list[dict[str, Any]]], baselines: list[str]) -> dict[str, dict[str, Any]]:
    """Every variant against every baseline, paired by seed: the average, each task, and the conflict index."""
    result: dict[str, dict[str, Any]] = {}
    for position, baseline in enumerate(baselines):
        for variant, seeds in runs.items():
            if variant == baseline or variant in baselines[:position]:  # a pair of baselines is compared once
                continue
            tasks = [t for t in TASK_SCORE if any(t in run["scores"] for run in seeds)]
            conflict = lambda run: (run["tug_of_war"] or {}).get("conflict_mean")
            result.setdefault(variant, {})[baseline] = {
                "average": _paired(seeds, runs[baseline], run_average),
                "tasks": {t: _paired(seeds, runs[baseline], lambda run, t=t: run["scores"].get(t)) for t in tasks},
                "conflict_mean": _paired(seeds, runs[baseline], conflict)}
    return result
