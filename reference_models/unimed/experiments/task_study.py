"""The task study of an experiment: is there a tug-of-war at the connector at all?

One variant (the plain MLP connector, in the built-in ``tug_of_war`` experiment) is trained

- on nested subsets of the image tasks (the first 2, 3, … of ``task_study.nested``), at the experiment's
  budget, to see whether the gradient-conflict index at the connector rises with the number of tasks; the
  full set is the variant's own joint run;
- on each image task alone (``single_task: true``), to see whether a connector that serves one task beats
  the joint one on that task. The single-task run sees as many examples of its task as the joint run did:
  its steps (and warm-up) are the joint budget times the task's share of the ``task_ratio`` mix.

Text-only QA stays in every run (it never reaches the connector but trains the LoRA, as in the joint runs).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from cmoe.errors import CMoEError
from cmoe.reference_models.unimed.data.synthetic import IMAGE_TASKS
from cmoe.reference_models.unimed.experiments.stats import mean_std, paired_test

if TYPE_CHECKING:
    from cmoe.reference_models.unimed.experiments.runner import ExperimentSpec


def _source(task: str) -> str:
    return f"synthetic_{task}"


def joint_tasks(config) -> tuple[str, ...]:
    """The tasks of a (synthetic) run."""
    if config.data.synthetic is None:
        raise CMoEError("experiment task_study: needs the built-in synthetic set (data.synthetic)")
    return tuple(config.data.synthetic.get("tasks", ())) or tuple(["qa", *IMAGE_TASKS])


def subset_overrides(config, image_tasks: list[str], *, equal_exposure: bool) -> dict[str, Any]:
    """Config overrides that train on QA plus `image_tasks`; with `equal_exposure`, the steps scaled to those
    tasks' share of the joint ``task_ratio`` mix (so each task sees as many examples as in the joint run)."""
    tasks = [t for t in joint_tasks(config) if t == "qa" or t in image_tasks]
    overrides: dict[str, Any] = {"data": {"synthetic": {"tasks": tasks}}}
    ratios = config.data.ratios
    if ratios:
        overrides["data"]["ratios"] = {"_replace": True, **{_source(t): ratios[_source(t)] for t in tasks}}
    if equal_exposure:
        if config.data.sampler != "task_ratio" or not ratios:
            raise CMoEError("experiment task_study.single_task: equal exposure needs data.sampler: task_ratio "
                            "with data.ratios (each task's share of the steps)")
        share = sum(ratios[_source(t)] for t in tasks) / sum(ratios[_source(t)] for t in joint_tasks(config))
        steps = max(1, round(config.train.steps * share))
        overrides["train"] = {"steps": steps, "warmup_steps": round(config.train.warmup_steps * share),
                              "save_every": steps, "analyze_every": None}
    return overrides


def _conflict(record: dict[str, Any]) -> float | None:
    return (record.get("tug_of_war") or {}).get("conflict_mean")


def run_task_study(spec: ExperimentSpec, out: Path, overrides: dict[str, Any] | None,
                   joint_runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Run (or reuse) the study's runs for every seed and summarise: conflict index by number of image tasks,
    and each task's single-task score against the joint run's, paired by seed."""
    from cmoe.reference_models.unimed.experiments.runner import TASK_SCORE, run_config, run_one

    study = spec.task_study or {}
    variant = study["variant"]
    nested = list(study.get("nested") or [])
    joint_by_seed = {run["seed"]: run for run in joint_runs}
    conflict: dict[str, Any] = {}
    single: dict[str, Any] = {}
    for seed in spec.seeds:
        joint_config = run_config(spec, variant, seed, out, overrides)
        present = [t for t in nested if t in joint_tasks(joint_config)]
        for size in range(2, len(present) + 1):
            subset = present[:size]
            if set(subset) == set(joint_tasks(joint_config)) - {"qa"}:
                record = joint_by_seed.get(seed)
            else:
                config = run_config(spec, variant, seed, out, overrides,
                                    run_dir=out / "task_study" / "+".join(subset) / f"seed{seed}",
                                    extra=subset_overrides(joint_config, subset, equal_exposure=False))
                record = run_one(config, seed)
            entry = conflict.setdefault(str(size), {"tasks": subset, "per_seed": {}})
            entry["per_seed"][str(seed)] = _conflict(record) if record else None
        if study.get("single_task"):
            for task in present:
                config = run_config(spec, variant, seed, out, overrides,
                                    run_dir=out / "task_study" / f"single_{task}" / f"seed{seed}",
                                    extra=subset_overrides(joint_config, [task], equal_exposure=True))
                record = run_one(config, seed)
                joint = joint_by_seed.get(seed, {}).get("scores", {}).get(task)
                entry = single.setdefault(task, {"metric": TASK_SCORE[task], "steps": config.train.steps,
                                                 "single": {}, "joint": {}})
                entry["single"][str(seed)] = record["scores"].get(task)
                entry["joint"][str(seed)] = joint
    for entry in conflict.values():
        entry["conflict"] = mean_std(list(entry["per_seed"].values()))
    for entry in single.values():
        seeds = [s for s in entry["single"] if entry["single"][s] is not None and entry["joint"].get(s) is not None]
        entry["single_mean_std"] = mean_std([entry["single"][s] for s in seeds])
        entry["joint_mean_std"] = mean_std([entry["joint"][s] for s in seeds])
        entry["test"] = paired_test([entry["single"][s] for s in seeds],
                                    [entry["joint"][s] for s in seeds]).to_dict() if len(seeds) >= 2 else None
    return {"variant": variant, "nested": nested, "conflict_by_tasks": conflict, "single_task": single}
