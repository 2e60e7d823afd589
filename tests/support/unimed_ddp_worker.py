"""Run by `test_unimed_ddp.py` under torchrun (``worker.py OUT ddp|fsdp``): train the test config, then write
this rank's (full) trainable weights and the sources of its first batch, so the test can check that ranks agree
and saw different data. The live tug-of-war analysis runs every 2 steps (every rank measures, rank 0 writes).
Under fsdp, a second trainer then resumes from the last checkpoint and writes its (full) trainable weights."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from safetensors.torch import save_file  # noqa: E402

from cmoe.reference_models.unimed.training.distributed import full_trainable_state  # noqa: E402
from cmoe.reference_models.unimed.training.train import Trainer  # noqa: E402
from unimed_tiny import test_config  # noqa: E402

out, mode = Path(sys.argv[1]), sys.argv[2]
trainer = Trainer(test_config(out / "run", train__steps=4, train__save_every=4, train__distributed=mode,
                              train__analyze_every=2, train__analyze_batches_per_task=1))
trainer.setup()
rank = trainer.ctx.rank
first = next(trainer._batches())
(out / f"batch_rank{rank}.json").write_text(json.dumps([s.image_id or s.fields["question"] for s in first.samples]))
trainer.train()
if mode == "fsdp":
    weights = full_trainable_state(trainer.model, rank0_only=False)
else:
    weights = {n: p.detach().contiguous() for n, p in trainer.model.named_parameters() if p.requires_grad}
save_file(weights, str(out / f"weights_rank{rank}.safetensors"))
if mode == "fsdp":  # resume: rank 0 loads the checkpoint into its model before the others receive their shards
    resumed = Trainer(trainer.config, resume="auto")
    resumed.setup()
    save_file(full_trainable_state(resumed.model, rank0_only=False), str(out / f"resumed_rank{rank}.safetensors"))
    (out / f"resumed_rank{rank}.json").write_text(json.dumps({"step": resumed.step,
                                                              "fingerprint": resumed.fingerprint,
                                                              "trained_fingerprint": trainer.fingerprint}))
(out / f"world_rank{rank}.txt").write_text(os.environ["WORLD_SIZE"])
trainer.close()
