"""Run by `test_unimed_auto_resume.py` under torchrun (``worker.py OUT``), two ranks whose timers prefer different
backends (rank 0 ``grouped_mm``, rank 1 ``sorted``), ``train.backend_choice: measure``: 4 straight steps in
``OUT/straight``, and in ``OUT/resumed`` 2 steps, then a resumed run whose timers would now pick the other backend
on each rank. Writes each rank's trainable weights of both runs."""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from safetensors.torch import save_file  # noqa: E402

from cmoe import auto  # noqa: E402
from cmoe.reference_models.unimed.training.train import Trainer  # noqa: E402
from unimed_tiny import test_config  # noqa: E402

PREFERRED = ("grouped_mm", "sorted")


def prefer(fastest: str):
    def timer(name, call, device) -> float:
        call()
        return 1.0 if name == fastest else 5.0

    return timer


def trained(folder: Path, fastest: str, steps: int | None = None) -> Trainer:
    """A trainer of the test config in `folder` (resuming what is there) after training, under a timer that
    prefers `fastest`; the process group stays up for the next one (the last one closes it)."""
    auto.configure_auto(timer=prefer(fastest))
    trainer = Trainer(test_config(folder, train__steps=4, train__save_every=2, train__backend_choice="measure"))
    trainer.train(steps=steps)
    return trainer


def save_weights(trainer: Trainer, path: Path) -> None:
    save_file({n: p.detach().contiguous() for n, p in trainer.model.named_parameters() if p.requires_grad}, str(path))


out, rank = Path(sys.argv[1]), int(os.environ["RANK"])
save_weights(trained(out / "straight", PREFERRED[rank]), out / f"straight_rank{rank}.safetensors")
trained(out / "resumed", PREFERRED[rank], steps=2)
last = trained(out / "resumed", PREFERRED[1 - rank])
save_weights(last, out / f"resumed_rank{rank}.safetensors")
last.close()
