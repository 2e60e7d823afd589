"""An experiment's results as Markdown tables and plots: scores (mean ± std over seeds), paired tests against
the baselines, the tug-of-war indexes, routing specialisation per task, and the task study."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cmoe.reference_models.unimed.analysis.plots import agg_figure, save_png
from cmoe.reference_models.unimed.experiments.runner import TASK_SCORE
from cmoe.reference_models.unimed.experiments.stats import mean_std


def _cell(pair: Any, scale: float = 100.0, digits: int = 1) -> str:
    mean, std = pair if pair is not None else (None, None)
    if mean is None:
        return "n/a"
    return f"{scale * mean:.{digits}f} ± {scale * std:.{digits}f}"


def _p(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _delta(test: dict[str, Any] | None, scale: float = 100.0, digits: int = 1) -> str:
    """``+1.2 (p 0.041 / 0.125)``: the mean paired difference, the t-test p and the sign-flip p."""
    if test is None:
        return "n/a"
    return f"{scale * test['mean_diff']:+.{digits}f} (p {_p(test['p_t'])} / {_p(test['p_sign_flip'])})"


def _tasks(agg: dict[str, Any]) -> list[str]:
    return [t for t in TASK_SCORE if any(t in a["tasks"] for a in agg.values())]


def format_scores(summary: dict[str, Any]) -> list[str]:
    agg = summary["aggregate"]
    tasks = _tasks(agg)
    header = ["variant", "connector params"] + [f"{t} ({TASK_SCORE[t]})" for t in tasks] + ["average"]
    lines = [f"Mean ± sample std over seeds {summary['seeds']}; scores in %.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for variant, a in agg.items():
        params = f"{a['connector_params']:,}" if a.get("connector_params") else "n/a"
        cells = [_cell(a["tasks"].get(t)) for t in tasks]
        lines.append(f"| {variant} | {params} | " + " | ".join(cells) + f" | **{_cell(a['average'])}** |")
    return lines


def format_comparisons(summary: dict[str, Any]) -> list[str]:
    comparisons = summary.get("comparisons") or {}
    if not comparisons:
        return []
    tasks = _tasks(summary["aggregate"])
    lines = ["", "Paired by seed against each baseline: mean difference in points, then the two-sided p of the "
             "paired t-test / of the exact sign-flip test (with 5 seeds the sign-flip p cannot go below 0.0625). "
             "Conflict: difference of the mean conflict index (lower is less tug-of-war).", "",
             "| variant | vs | average | " + " | ".join(tasks) + " | conflict index |",
             "|" + "---|" * (len(tasks) + 4)]
    for variant, against in comparisons.items():
        for baseline, c in against.items():
            cells = [_delta(c["tasks"].get(t)) for t in tasks]
            lines.append(f"| {variant} | {baseline} | **{_delta(c['average'])}** | " + " | ".join(cells)
                         + f" | {_delta(c.get('conflict_mean'), scale=1.0, digits=3)} |")
    return lines


def format_tug_of_war(summary: dict[str, Any]) -> list[str]:
    agg = summary["aggregate"]
    if not any(a["tug_of_war"] for a in agg.values()):
        return []
    lines = ["", "Tug-of-war at the connector (all parameters; mean over the analysed steps, then over seeds):", "",
             "| variant | conflict index | magnitude CV | conflict at end | CV at end | routing entropy (norm.) |",
             "|---|---|---|---|---|---|"]
    for variant, a in agg.items():
        t = a["tug_of_war"]
        get = lambda key: _cell(t.get(key), scale=1.0, digits=3)
        lines.append(f"| {variant} | {get('conflict_mean')} | {get('cv_mean')} | {get('conflict_final')} | "
                     f"{get('cv_final')} | {get('routing_entropy')} |")
    return lines


def task_separation(routing: dict[str, dict[str, Any]]) -> float | None:
    """How differently a run's tasks route: the mean over task pairs of the total-variation distance between
    their mean routing weights (0 = every task uses the experts alike, 1 = disjoint experts)."""
    tasks = list(routing)
    pairs = [(a, b) for i, a in enumerate(tasks) for b in tasks[i + 1:]]
    if not pairs:
        return None
    tv = lambda p, q: 0.5 * sum(abs(x - y) for x, y in zip(p, q))
    return sum(tv(routing[a]["weights"], routing[b]["weights"]) for a, b in pairs) / len(pairs)


def routing_by_variant(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per routed variant: each task's mean routing weight per expert in the first seed's run (expert numbers
    mean nothing across seeds, so weights are not averaged over them), each task's normalised entropy and the
    task separation, mean ± std over seeds."""
    result: dict[str, dict[str, Any]] = {}
    for variant, runs in summary["runs"].items():
        routed = [(run["seed"], run["tug_of_war"]["routing"]) for run in runs
                  if (run.get("tug_of_war") or {}).get("routing")]
        if not routed:
            continue
        seed, first = routed[0]
        result[variant] = {
            "seed": seed,
            "tasks": {task: {"weights": first[task]["weights"],
                             "entropy": mean_std([r[task]["normalized_entropy"] for _, r in routed if task in r])}
                      for task in first},
            "separation": mean_std([task_separation(r) for _, r in routed])}
    return result


def format_routing(summary: dict[str, Any]) -> list[str]:
    routing = routing_by_variant(summary)
    if not routing:
        return []
    lines = ["", "Routing at the end of training. Task separation: mean over task pairs of the total-variation "
             "distance between their mean routing weights (0 = all tasks use the experts alike, 1 = disjoint "
             "experts); entropy of each task's mean routing weight, normalised by ln E (1 = uniform, 0 = one "
             "expert); both mean ± std over seeds:", "",
             "| variant | task separation | entropy (norm.), mean over tasks |", "|---|---|---|"]
    for variant, r in routing.items():
        entropies = [t["entropy"][0] for t in r["tasks"].values() if t["entropy"][0] is not None]
        mean_entropy = sum(entropies) / len(entropies) if entropies else None
        lines.append(f"| {variant} | {_cell(r['separation'], scale=1.0, digits=3)} | "
                     f"{'n/a' if mean_entropy is None else f'{mean_entropy:.3f}'} |")
    lines += ["", "Mean routing weight per expert for each task, in the first seed's run (expert numbers differ "
              "between seeds):", "", "| variant (seed) | task | weight per expert | entropy (norm.) over seeds |",
              "|---|---|---|---|"]
    for variant, r in routing.items():
        for task, t in r["tasks"].items():
            weights = " ".join(f"{w:.2f}" for w in t["weights"])
            lines.append(f"| {variant} ({r['seed']}) | {task} | {weights} | "
                         f"{_cell(t['entropy'], scale=1.0, digits=3)} |")
    return lines


def format_task_study(summary: dict[str, Any]) -> list[str]:
    study = summary.get("task_study")
    if not study:
        return []
    lines = ["", f"Task study ({study['variant']} connector). Conflict index by number of image tasks trained "
             "together (QA in every run), mean ± std over seeds:", "",
             "| image tasks | tasks | conflict index |", "|---|---|---|"]
    for size, entry in sorted(study["conflict_by_tasks"].items(), key=lambda kv: int(kv[0])):
        lines.append(f"| {size} | {', '.join(entry['tasks'])} | {_cell(entry['conflict'], scale=1.0, digits=3)} |")
    if study.get("single_task"):
        lines += ["", "Single-task connector vs the joint one, each on its own task, at equal exposure (the single-task "
                  "run sees as many examples of its task as the joint run did); paired by seed:", "",
                  "| task (metric) | single-task steps | single-task | joint | single − joint (p t / sign-flip) |",
                  "|---|---|---|---|---|"]
        for task, entry in study["single_task"].items():
            lines.append(f"| {task} ({entry['metric']}) | {entry['steps']} | {_cell(entry['single_mean_std'])} | "
                         f"{_cell(entry['joint_mean_std'])} | {_delta(entry['test'])} |")
    return lines


def format_experiment(summary: dict[str, Any]) -> str:
    """The Markdown report of an experiment: scores, paired comparisons, tug-of-war, routing, task study."""
    lines = (format_scores(summary) + format_comparisons(summary) + format_tug_of_war(summary)
             + format_routing(summary) + format_task_study(summary))
    return "\n".join(lines) + "\n"


def plot_experiment(summary: dict[str, Any], out_dir: Path) -> list[Path]:
    """``scores.png`` (per-task score of each variant, error bars over seeds), ``conflict.png`` (conflict index
    over training, mean over seeds), ``routing.png`` (task × expert weight maps) and, with a task study,
    ``task_study.png`` (conflict by number of tasks; single-task vs joint)."""
    agg = summary["aggregate"]
    tasks = _tasks(agg) + ["average"]
    fig = agg_figure(1.3 * len(tasks) + 3, 4)
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
    ax.legend(title="variant", fontsize=7)
    paths = [out_dir / "scores.png"]
    save_png(fig, paths[-1])
    paths += _plot_conflict_curves(summary, out_dir)
    paths += _plot_routing(summary, out_dir)
    paths += _plot_task_study(summary, out_dir)
    return paths


def _curves(summary: dict[str, Any], out_dir: Path) -> dict[str, dict[int, list[float]]]:
    curves: dict[str, dict[int, list[float]]] = {}
    for variant, runs in summary["runs"].items():
        for run in runs:
            curve = (run.get("tug_of_war") or {}).get("conflict_curve")
            if curve is None:  # results written before curves were recorded: read the run's report
                report = out_dir / variant / f"seed{run['seed']}" / "tug_of_war" / "tug_of_war.json"
                if not report.is_file():
                    continue
                curve = [[s["step"], s["gradients"]["all"]["direction"]["conflict"]]
                         for s in json.loads(report.read_text())["steps"]]
            for step, value in curve:
                if value is not None:
                    curves.setdefault(variant, {}).setdefault(step, []).append(value)
    return curves


def _plot_conflict_curves(summary: dict[str, Any], out_dir: Path) -> list[Path]:
    curves = _curves(summary, out_dir)
    if not curves:
        return []
    fig = agg_figure(6, 4)
    ax = fig.add_subplot()
    for variant, by_step in curves.items():
        steps = sorted(by_step)
        ax.plot(steps, [sum(by_step[s]) / len(by_step[s]) for s in steps], marker="o", label=variant)
    ax.set_xlabel("training step")
    ax.set_ylabel("conflict index: mean max(0, −cos)")
    ax.set_title("Gradient conflict between tasks at the connector (mean over seeds)")
    ax.legend(title="variant", fontsize=7)
    path = out_dir / "conflict.png"
    save_png(fig, path)
    return [path]


def _plot_routing(summary: dict[str, Any], out_dir: Path) -> list[Path]:
    routing = routing_by_variant(summary)
    if not routing:
        return []
    fig = agg_figure(3.2 * len(routing), 3.2)
    for i, (variant, r) in enumerate(routing.items()):
        tasks = r["tasks"]
        ax = fig.add_subplot(1, len(routing), i + 1)
        names = list(tasks)
        image = ax.imshow([tasks[t]["weights"] for t in names], vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_yticks(range(len(names)), names)
        ax.set_xticks(range(len(tasks[names[0]]["weights"])))
        ax.set_xlabel("expert")
        ax.set_title(f"{variant} (seed {r['seed']})", fontsize=9)
    fig.colorbar(image, ax=fig.axes, shrink=0.8, label="mean routing weight")
    path = out_dir / "routing.png"
    save_png(fig, path)
    return [path]


def _plot_task_study(summary: dict[str, Any], out_dir: Path) -> list[Path]:
    study = summary.get("task_study")
    if not study or not study["conflict_by_tasks"]:
        return []
    fig = agg_figure(10, 3.8)
    ax = fig.add_subplot(1, 2, 1)
    sizes = sorted(study["conflict_by_tasks"], key=int)
    for size in sizes:
        values = [v for v in study["conflict_by_tasks"][size]["per_seed"].values() if v is not None]
        ax.scatter([int(size)] * len(values), values, color="grey", s=12)
    means = [study["conflict_by_tasks"][s]["conflict"][0] for s in sizes]
    ax.plot([int(s) for s in sizes], [m if m is not None else float("nan") for m in means], marker="o")
    ax.set_xlabel("image tasks trained together")
    ax.set_ylabel("conflict index (mean over training)")
    ax.set_title(f"{study['variant']}: conflict vs number of tasks")
    ax = fig.add_subplot(1, 2, 2)
    single = study.get("single_task") or {}
    names = list(single)
    for offset, key, label in ((-0.2, "single_mean_std", "single-task"), (0.2, "joint_mean_std", "joint")):
        pairs = [single[t][key] for t in names]
        ax.bar([x + offset for x in range(len(names))], [100 * (m or 0) for m, _ in pairs], 0.4,
               yerr=[100 * (s or 0) for _, s in pairs], capsize=2, label=label)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("own-task score (%)")
    ax.set_title("single-task vs joint connector (equal exposure)")
    ax.legend(fontsize=8)
    path = out_dir / "task_study.png"
    save_png(fig, path)
    return [path]
