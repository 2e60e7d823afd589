"""The tug-of-war report drawn: task × task gradient cosines, the indexes over training, routing per task and
parameter histograms, as PNGs on matplotlib's non-interactive Agg canvas (matplotlib is imported only when
plotting); `write_report` writes the JSON report and every plot that applies."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cmoe.errors import expect
from cmoe.io import atomic_write
from cmoe.reference_models.unimed.analysis.measures import ParameterStats, TaskRouting
from cmoe.reference_models.unimed.analysis.report import REPORT_JSON, TugOfWarReport

__all__ = [
    "agg_figure", "plot_cosine_heatmap", "plot_index_curves", "plot_parameter_histograms", "plot_routing_bars",
    "save_png", "write_report",
]


def agg_figure(width: float, height: float) -> Any:
    """A matplotlib Figure on the non-interactive Agg canvas (no pyplot, no global backend switch)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: Any, path: str | os.PathLike) -> Path:
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))


def plot_cosine_heatmap(cosine: torch.Tensor | Sequence[Sequence[float]], tasks: Sequence[str],
                        path: str | os.PathLike, *, title: str | None = None,
                        zero_norm_tasks: Sequence[str] = ()) -> Path:
    """Task × task gradient cosines, diverging colormap centred at 0 (−1 blue … +1 red), values annotated;
    zero-norm tasks are starred. Written to `path` (PNG)."""
    cos = np.asarray(torch.as_tensor(cosine, dtype=torch.float64).tolist(), dtype=np.float64).reshape(
        len(tasks), len(tasks))
    size = max(4.0, 1.0 + 0.9 * len(tasks))
    fig = agg_figure(size + 1.2, size)
    ax = fig.add_subplot()
    image = ax.imshow(cos, cmap="RdBu_r", vmin=-1.0, vmax=1.0)
    labels = [f"{t}*" if t in set(zero_norm_tasks) else str(t) for t in tasks]
    ax.set_xticks(range(len(tasks)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(tasks)), labels)
    for i in range(len(tasks)):
        for j in range(len(tasks)):
            value = cos[i, j]
            ax.text(j, i, "–" if not np.isfinite(value) else f"{value:.2f}", ha="center", va="center",
                    fontsize=9, color="white" if np.isfinite(value) and abs(value) > 0.6 else "black")
    ax.set_xlabel("task")
    ax.set_ylabel("task")
    fig.colorbar(image, ax=ax, label="gradient cosine similarity")
    note = "\n* zero gradient: its cosines are set to 0" if zero_norm_tasks else ""
    ax.set_title((title or "Gradient cosine similarity between tasks") + note, fontsize=10)
    return save_png(fig, path)


def plot_index_curves(report: TugOfWarReport, path: str | os.PathLike, *, groups: Sequence[str] | None = None,
                      title: str | None = None) -> Path:
    """Direction (conflict) and magnitude (CV) indexes over training steps, one line per parameter group."""
    direction, magnitude = report.index_curves("direction"), report.index_curves("magnitude")
    expect(bool(direction), "report", "at least one recorded step with gradients", "none")
    names = list(direction) if groups is None else [g for g in groups if g in direction]
    fig = agg_figure(11.0, 4.2)
    axes = fig.subplots(1, 2)
    panels = ((axes[0], direction, "direction index: mean max(0, −cos)", "Gradient direction conflict"),
              (axes[1], magnitude, "magnitude index: CV of task gradient norms", "Gradient magnitude imbalance"))
    for ax, curves, ylabel, subtitle in panels:
        for group in names:
            steps, values = curves[group]
            ax.plot(steps, values, marker="o", markersize=3, label=group)
        ax.set_xlabel("training step")
        ax.set_ylabel(ylabel)
        ax.set_title(subtitle)
        ax.grid(alpha=0.3)
        if len(names) > 1:
            ax.legend(title="parameter group", fontsize=8)
    fig.suptitle(title or "Tug-of-war indexes over training")
    return save_png(fig, path)


def plot_routing_bars(routing: Mapping[str, TaskRouting | Sequence[float]], path: str | os.PathLike, *,
                      title: str | None = None) -> Path:
    """Stacked bars: each task's mean routing weight per expert (normalised entropy above each bar)."""
    expect(len(routing) > 0, "routing", "a non-empty {task: routing} mapping", {})
    tasks = list(routing)
    rows = [np.asarray(r.mean_weight if isinstance(r, TaskRouting) else list(r), dtype=np.float64)
            for r in routing.values()]
    experts = max(len(r) for r in rows)
    expect(all(len(r) == experts for r in rows), "routing", "the same number of experts for every task",
           [len(r) for r in rows])
    fig = agg_figure(max(5.0, 1.2 + 0.9 * len(tasks)), 4.5)
    ax = fig.add_subplot()
    bottom = np.zeros(len(tasks))
    colors = [f"C{e % 10}" for e in range(experts)]
    for e in range(experts):
        heights = np.array([r[e] for r in rows])
        ax.bar(range(len(tasks)), heights, bottom=bottom, color=colors[e], label=f"expert {e}")
        bottom += heights
    for i, r in enumerate(routing.values()):
        if isinstance(r, TaskRouting) and math.isfinite(r.normalized_entropy):
            ax.text(i, bottom[i], f"H={r.normalized_entropy:.2f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(tasks)), tasks, rotation=30, ha="right")
    ax.set_xlabel("task")
    ax.set_ylabel("mean routing weight")
    ax.set_ylim(0, max(1.0, float(bottom.max())) * 1.12)
    if experts > 1:
        ax.legend(title="expert", fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title(title or "Routing weight per expert for each task (H = entropy / ln E)")
    return save_png(fig, path)


def plot_parameter_histograms(parameters: Mapping[str, ParameterStats], path: str | os.PathLike, *,
                              title: str | None = None) -> Path:
    """One row per group: its weight histogram and, when a previous snapshot was given, its update histogram."""
    expect(len(parameters) > 0, "parameters", "a non-empty {group: ParameterStats} mapping", {})
    with_updates = any(p.update_histogram is not None for p in parameters.values())
    cols = 2 if with_updates else 1
    fig = agg_figure(5.0 * cols, 1.2 + 2.2 * len(parameters))
    axes = np.asarray(fig.subplots(len(parameters), cols, squeeze=False))
    for row, (group, stats) in enumerate(parameters.items()):
        panels = [(stats.histogram, "weight value",
                   f"{group}: weights (‖w‖={stats.norm:.3g}, mean={stats.mean:.2g}, std={stats.std:.2g})")]
        if with_updates:
            rel = stats.relative_update
            panels.append((stats.update_histogram, "update value (w − w_prev)",
                           f"{group}: update (‖Δw‖/‖w_prev‖={rel:.2g})" if rel is not None else f"{group}: no update"))
        for col, (hist, xlabel, subtitle) in enumerate(panels):
            ax = axes[row, col]
            if hist is not None:
                ax.stairs(hist.counts, hist.edges, fill=True, color="C0" if col == 0 else "C1")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("count")
            ax.set_title(subtitle, fontsize=9)
    fig.suptitle(title or "Connector parameter distributions per expert / router")
    return save_png(fig, path)


def write_report(report: TugOfWarReport, out_dir: str | os.PathLike, *, step: int | None = None,
                 plots: bool = True) -> list[Path]:
    """Write ``tug_of_war.json`` into `out_dir` and, with `plots`, every applicable PNG: ``index_curves.png``,
    and for the chosen step (default the last) ``cosine_<group>.png`` per group, ``routing.png`` and
    ``parameter_histograms.png`` when that step has routing / parameter statistics."""
    out_dir = Path(out_dir)
    paths = [report.save_json(out_dir / REPORT_JSON)]
    if not report.steps or not plots:
        return paths
    chosen = report.steps[-1] if step is None else next((s for s in report.steps if s.step == step), None)
    expect(chosen is not None, "step", f"one of the recorded steps {[s.step for s in report.steps]}", step)
    if any(s.gradients for s in report.steps):
        paths.append(plot_index_curves(report, out_dir / "index_curves.png"))
    for group, analysis in chosen.gradients.items():
        paths.append(plot_cosine_heatmap(
            analysis.cosine, analysis.tasks, out_dir / f"cosine_{group}.png",
            title=f"Gradient cosine between tasks — {group}, step {chosen.step}",
            zero_norm_tasks=analysis.zero_norm_tasks))
    if chosen.routing:
        paths.append(plot_routing_bars(chosen.routing, out_dir / "routing.png",
                                       title=f"Routing weight per expert for each task, step {chosen.step}"))
    if chosen.parameters:
        paths.append(plot_parameter_histograms(chosen.parameters, out_dir / "parameter_histograms.png",
                                               title=f"Connector parameters per group, step {chosen.step}"))
    return paths

