"""A run's curves: the loss and each task's loss as PNG plots from ``metrics.jsonl``, and the same scalars as
TensorBoard event files when the ``tensorboard`` package is installed (``pip install 'cmoe[tensorboard]'``;
optional, so a run without it writes no event files and says nothing).

The PNGs are redrawn from the whole ``metrics.jsonl`` whenever a checkpoint is written and at the end, so a
resumed run's plots cover all its steps. The event files are written as records are logged (``TensorBoardLog``);
``tensorboard --logdir <run>/tensorboard`` shows them.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

from cmoe.io import atomic_write

CURVES_DIR = "curves"
TENSORBOARD_DIR = "tensorboard"


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` (none when there is no such file yet; lines that are not JSON objects
    with a step are skipped)."""
    records: list[dict[str, Any]] = []
    if not Path(path).is_file():
        return records
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records


def plot_curves(metrics: str | os.PathLike, out_dir: str | os.PathLike) -> list[Path]:
    """``loss.png`` (the training loss, and the aux loss when there is one) and ``task_loss.png`` (one line per
    task) in `out_dir`, from `metrics`; nothing when it holds no record. Each file is written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics)
    if not records:
        return []
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    steps = [r["step"] for r in records]
    written = []

    figure, axis = plt.subplots(figsize=(6, 3.5), dpi=100)
    axis.plot(steps, [r["loss"] for r in records], label="loss")
    if any(r.get("aux_loss") for r in records):
        axis.plot(steps, [r.get("aux_loss", 0.0) for r in records], label="aux loss")
    axis.set(xlabel="step", ylabel="loss", title="training loss")
    axis.legend()
    written.append(_save(figure, out / "loss.png"))

    figure, axis = plt.subplots(figsize=(6, 3.5), dpi=100)
    tasks = sorted({task for r in records for task in r.get("task_loss", {})})
    for task in tasks:
        points = [(r["step"], r["task_loss"][task]) for r in records if task in r.get("task_loss", {})]
        axis.plot([s for s, _ in points], [v for _, v in points], label=task)
    axis.set(xlabel="step", ylabel="loss", title="loss per task (answer tokens of the task's batches)")
    if tasks:
        axis.legend(ncol=3, fontsize="small")
    written.append(_save(figure, out / "task_loss.png"))
    return written


def _save(figure, path: Path) -> Path:
    import matplotlib.pyplot as plt

    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png"))
    plt.close(figure)
    return path


def tensorboard_available() -> bool:
    return importlib.util.find_spec("tensorboard") is not None


class TensorBoardLog:
    """Scalars of each logged record (loss, aux loss, lr, throughput, grad norm, each task's loss and routing
    weights) into ``<run>/tensorboard`` event files; does nothing without the ``tensorboard`` package."""

    def __init__(self, run_dir: str | os.PathLike, writer: Any = None):
        self.writer = writer
        if writer is None and tensorboard_available():
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(Path(run_dir) / TENSORBOARD_DIR))

    def log(self, record: dict[str, Any]) -> None:
        if self.writer is None:
            return
        step = record["step"]
        for key in ("loss", "aux_loss", "lr", "samples_per_s", "grad_norm"):
            if isinstance(record.get(key), (int, float)):
                self.writer.add_scalar(f"train/{key}", record[key], step)
        for task, loss in record.get("task_loss", {}).items():
            self.writer.add_scalar(f"task_loss/{task}", loss, step)
        for task, weights in record.get("routing", {}).items():
            for expert, weight in enumerate(weights):
                self.writer.add_scalar(f"routing/{task}/expert_{expert}", weight, step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
