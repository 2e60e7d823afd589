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
from cmoe.reference_models.unimed.config import BUILTIN_CONFIGS, CONFIG_DIR, _merge, load_config
from cmoe.reference_models.unimed.metrics import Metric

TASK_SCORE = {"qa": "all/accuracy", "vqa": "all/f1", "report": "rougeL", "rec": "miou", "reg": "accuracy",
              "cls": "accuracy"}
"""The one number per task that the average is taken over (all in 0–1, higher is better)."""

BUILTIN_EXPERIMENTS = {"cmoe_vs_mlp": "experiment_cmoe_vs_mlp.yaml", "imax": "experiment_imax.yaml",
                       "paper": "experiment_paper.yaml"}


@dataclass
class ExperimentSpec:
    name: str
    base: str
    variants: dict[str, dict[str, Any]]
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    overrides: dict[str, Any] = field(default_factory=dict)
    description: str = ""


def load_experiment(name_or_path: str | os.PathLike) -> ExperimentSpec:
    """An experiment file (YAML: name, base, overrides, variants, seeds) or a built-in one by name."""
    import yaml

    path = CONFIG_DIR / BUILTIN_EXPERIMENTS[str(name_or_path)] if str(name_or_path) in BUILTIN_EXPERIMENTS \
        else Path(name_or_path)
    if not path.is_file():
        raise CMoEError(f"experiment: {str(name_or_path)!r} is neither a file nor a built-in experiment; "
                        f"built-in: {', '.join(sorted(BUILTIN_EXPERIMENTS))}")
    data = yaml.safe_load(path.read_text()) or {}
    known = {"name", "base", "variants", "seeds", "overrides", "description"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise CMoEError(f"experiment {path}: unknown key(s) {unknown}; known keys: {sorted(known)}")
    expect(isinstance(data.get("variants"), dict) and data["variants"], f"experiment {path}: variants",
           "a non-empty mapping of variant name → config overrides", data.get("variants"))
    base = str(data.get("base", "tiny"))
    if base not in BUILTIN_CONFIGS and not Path(base).is_absolute():
        base = str(path.parent / base)
    return ExperimentSpec(name=data.get("name", path.stem), base=base,
                          variants={k: v or {} for k, v in data["variants"].items()},
                          seeds=list(data.get("seeds", [0, 1, 2])), overrides=data.get("overrides") or {},
                          description=data.get("description", ""))


def run_config(spec: ExperimentSpec, variant: str, seed: int, out_dir: Path, overrides: dict[str, Any] | None = None):
    """The recipe config of one (variant, seed) run."""
    merged = _merge(_merge(spec.overrides, spec.variants[variant]), overrides or {})
    merged = _merge(merged, {"seed": seed, "name": f"{spec.name}/{variant}/seed{seed}",
                             "output_dir": str(out_dir / variant / f"seed{seed}")})
    return load_config(spec.base, merged)


def _score(results: dict[str, dict[str, Metric]], task: str) -> float | None:
    metric = results.get(task, {}).get(TASK_SCORE[task])
    return None if metric is None else metric.value


def _tug_summary(run_dir: Path) -> dict[str, float] | None:
    path = run_dir / "tug_of_war" / "tug_of_war.json"
    if not path.is_file():
        return None
    steps = json.loads(path.read_text())["steps"]
    group = "all"
    conflict = [s["gradients"][group]["direction"]["conflict"] for s in steps if group in s["gradients"]]
    cv = [s["gradients"][group]["magnitude"]["cv"] for s in steps if group in s["gradients"]]
    valid = lambda xs: [x for x in xs if x is not None]
    summary = {"conflict_mean": statistics.fmean(valid(conflict)) if valid(conflict) else None,
               "cv_mean": statistics.fmean(valid(cv)) if valid(cv) else None,
               "conflict_final": conflict[-1] if conflict else None, "cv_final": cv[-1] if cv else None}
    if steps and steps[-1].get("routing"):
        summary["routing_entropy"] = statistics.fmean(r["normalized_entropy"] for r in steps[-1]["routing"].values())
    return summary


def run_experiment(spec: ExperimentSpec, out_dir: str | os.PathLike, overrides: dict[str, Any] | None = None,
                   variants: list[str] | None = None) -> dict[str, Any]:
    """Train, evaluate and analyse every (variant, seed); write ``results.json``, ``results.md`` and plots."""
    from cmoe.reference_models.unimed.evaluate import results_to_dict, run_evaluation
    from cmoe.reference_models.unimed.train import Trainer

    out = Path(out_dir)
    runs: dict[str, list[dict[str, Any]]] = {}
    chosen = variants or list(spec.variants)
    unknown = sorted(set(chosen) - set(spec.variants))
    if unknown:
        raise CMoEError(f"variants {unknown} are not in experiment {spec.name!r}; known: {sorted(spec.variants)}")
    for variant in chosen:
        for seed in spec.seeds:
            config = run_config(spec, variant, seed, out, overrides)
            Trainer(config, resume="auto").train()
            results = run_evaluation(config)
            model_params = _trainable_connector_params(Path(config.output_dir))
            runs.setdefault(variant, []).append({
                "seed": seed, "scores": {t: _score(results, t) for t in TASK_SCORE if t in results},
                "metrics": results_to_dict(results), "tug_of_war": _tug_summary(Path(config.output_dir)),
                "connector_params": model_params})
    summary = {"name": spec.name, "description": spec.description, "seeds": spec.seeds, "runs": runs,
               "aggregate": aggregate(runs)}
    write_json(out / "results.json", summary)
    table = format_experiment(summary)
    atomic_write(out / "results.md", lambda p: Path(p).write_text(table))
    plot_experiment(summary, out)
    return summary


def _trainable_connector_params(run_dir: Path) -> int | None:
    from cmoe.reference_models.unimed.checkpoint import find_latest
    from safetensors import safe_open

    latest = find_latest(run_dir)
    if latest is None:
        return None
    with safe_open(str(latest / "trainable.safetensors"), "pt") as handle:
        return sum(math.prod(handle.get_slice(k).get_shape()) for k in handle.keys() if k.startswith("connector."))


def _mean_std(values: list[float | None]) -> tuple[float | None, float | None]:
    present = [v for v in values if v is not None]
    if not present:
        return None, None
    return statistics.fmean(present), statistics.pstdev(present) if len(present) > 1 else 0.0


def aggregate(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Mean and std over seeds of each task's score, the task average, and the tug-of-war summaries."""
    result: dict[str, Any] = {}
    for variant, seeds in runs.items():
        tasks = sorted({t for run in seeds for t in run["scores"]}, key=list(TASK_SCORE).index)
        per_task = {t: _mean_std([run["scores"].get(t) for run in seeds]) for t in tasks}
        averages = [statistics.fmean(v for v in run["scores"].values() if v is not None) for run in seeds]
        tug_keys = sorted({k for run in seeds if run["tug_of_war"] for k in run["tug_of_war"]})
        tug = {k: _mean_std([run["tug_of_war"].get(k) if run["tug_of_war"] else None for run in seeds])
               for k in tug_keys}
        result[variant] = {"tasks": per_task, "average": _mean_std(averages), "tug_of_war": tug,
                           "connector_params": seeds[0].get("connector_params")}
    return result


def _cell(pair: tuple[float | None, float | None], scale: float = 100.0, digits: int = 1) -> str:
    mean, std = pair
    if mean is None:
        return "n/a"
    return f"{scale * mean:.{digits}f} ± {scale * std:.{digits}f}"


def format_experiment(summary: dict[str, Any]) -> str:
    """The Markdown table of an experiment: per-task scores, their average, and the tug-of-war indexes."""
    agg = summary["aggregate"]
    tasks = [t for t in TASK_SCORE if any(t in a["tasks"] for a in agg.values())]
    header = ["variant", "connector params"] + [f"{t} ({TASK_SCORE[t]})" for t in tasks] + ["average"]
    lines = [f"Mean ± std over seeds {summary['seeds']}; scores in %.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for variant, a in agg.items():
        params = f"{a['connector_params']:,}" if a.get("connector_params") else "n/a"
        cells = [_cell(a["tasks"].get(t, (None, None))) for t in tasks]
        lines.append(f"| {variant} | {params} | " + " | ".join(cells) + f" | **{_cell(a['average'])}** |")
    if any(a["tug_of_war"] for a in agg.values()):
        lines += ["", "Tug-of-war at the connector (all parameters; mean over the analysed steps, then over seeds):",
                  "", "| variant | conflict index | magnitude CV | conflict at end | CV at end | routing entropy (norm.) |",
                  "|---|---|---|---|---|---|"]
        for variant, a in agg.items():
            t = a["tug_of_war"]
            get = lambda key: _cell(t.get(key, (None, None)), scale=1.0, digits=3)
            lines.append(f"| {variant} | {get('conflict_mean')} | {get('cv_mean')} | {get('conflict_final')} | "
                         f"{get('cv_final')} | {get('routing_entropy')} |")
    return "\n".join(lines) + "\n"


def plot_experiment(summary: dict[str, Any], out_dir: Path) -> list[Path]:
    """``scores.png`` (per-task score of each variant, error bars over seeds) and ``conflict.png`` (conflict
    index over training, seed 0 of each variant)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    agg = summary["aggregate"]
    tasks = [t for t in TASK_SCORE if any(t in a["tasks"] for a in agg.values())] + ["average"]
    fig = Figure(figsize=(1.3 * len(tasks) + 3, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(agg))
    for i, (variant, a) in enumerate(agg.items()):
        pairs = [a["tasks"].get(t, (None, None)) if t != "average" else a["average"] for t in tasks]
        means = [100 * (m or 0) for m, _ in pairs]
        stds = [100 * (s or 0) for _, s in pairs]
        ax.bar([x + i * width for x in range(len(tasks))], means, width, yerr=stds, capsize=2, label=variant)
    ax.set_xticks([x + width * (len(agg) - 1) / 2 for x in range(len(tasks))], tasks)
    ax.set_ylabel("score (%)")
    ax.set_title(f"{summary['name']}: per-task score, mean ± std over {len(summary['seeds'])} seeds")
    ax.legend(title="variant", fontsize=8)
    paths = [out_dir / "scores.png"]
    fig.savefig(paths[0], dpi=120, bbox_inches="tight")
    curves = {}
    for variant, runs in summary["runs"].items():
        report = out_dir / variant / f"seed{runs[0]['seed']}" / "tug_of_war" / "tug_of_war.json"
        if report.is_file():
            steps = json.loads(report.read_text())["steps"]
            curves[variant] = ([s["step"] for s in steps],
                               [s["gradients"]["all"]["direction"]["conflict"] for s in steps])
    if curves:
        fig = Figure(figsize=(6, 4))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        for variant, (xs, ys) in curves.items():
            ax.plot(xs, [y if y is not None else float("nan") for y in ys], marker="o", label=variant)
        ax.set_xlabel("training step")
        ax.set_ylabel("conflict index: mean max(0, −cos)")
        ax.set_title("Gradient conflict between tasks at the connector (seed 0)")
        ax.legend(title="variant", fontsize=8)
        paths.append(out_dir / "conflict.png")
        fig.savefig(paths[1], dpi=120, bbox_inches="tight")
    return paths
