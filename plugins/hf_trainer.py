"""HF Trainer integration: log the attached connector's aux loss next to the Trainer's own ``loss``.

The aux loss is already part of ``output.loss`` (weighted the same at any gradient accumulation, see
`cmoe.plugins.attached_model`); this adds its mean over the training calls since the last log as
``cmoe_aux_loss`` to every training log (progress bar, ``trainer.state.log_history`` and the reporting
integrations: TensorBoard, W&B, ...).

TRL's ``SFTTrainer`` computes its training loss itself (from its fused LM head) and never reads ``output.loss``: there
the aux loss is logged but not trained unless the trainer's ``compute_loss`` is HF Trainer's (docs/finetune.md).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from cmoe.extras import require
from cmoe.plugins.attached_model import attachments

LOG_KEY = "cmoe_aux_loss"


def aux_loss_callback() -> Any:
    """A `transformers.TrainerCallback` adding ``cmoe_aux_loss`` to training logs (see `log_aux_loss`)."""
    require("hf", "cmoe.plugins.hf_trainer")
    from transformers import TrainerCallback

    class AuxLossLogger(TrainerCallback):
        """Adds the mean aux loss since the last log to each training log."""

        def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, model: nn.Module | None = None,
                   **kwargs: Any) -> None:
            found = [] if model is None else attachments(model)
            values = [v for attachment in found if (v := attachment.take_logged_aux()) is not None]
            if logs is None or not values:
                return
            logs[LOG_KEY] = round(sum(values) / len(values), 6)
            last = state.log_history[-1] if state.log_history else None
            if last is not None and last.get("step") == state.global_step and LOG_KEY not in last:
                last[LOG_KEY] = logs[LOG_KEY]

    return AuxLossLogger()


def log_aux_loss(trainer: Any) -> Any:
    """Make `trainer` log ``cmoe_aux_loss`` with every training log; call once after building it. The callback
    goes first so the progress printer and the reporting integrations see the value. Returns the callback."""
    callback = aux_loss_callback()
    trainer.callback_handler.callbacks.insert(0, callback)
    return callback
