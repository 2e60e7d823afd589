"""``cmoe unimed pretrain``: the tiny recipe's frozen components, pretrained on the project's synthetic data.

Why: Uni-Med freezes a *pretrained* vision encoder (EVA-CLIP) and a *pretrained* LLM (LLaMA-2, + LoRA) and
trains only the connector. With random-init tiny components nothing visual is learnt (see
``docs/experiments/cmoe_vs_mlp``), so this module makes small stand-ins from the synthetic set itself:

* **vision encoder** (the tiny config's 2-layer CLIP): supervised heads on its last hidden state (what the
  recipe feeds the connector, CLS dropped). Per patch token: the soft mix of background / each organ / lesion
  under the patch (location, extent, organ identity) and the modality (texture); per image, on the mean patch
  token: modality, body region, organs shown, organ count, lesion quadrant, size and brightness. Labels come
  from the scene's ground truth; the organ map is the same scene rendered without texture, whose grey levels
  are exact. Images mix texture amplitudes 10 and 30 (the tiny default and the experiments').
* **LLM** (the tiny config's 2-layer LLaMA): a causal language model over the synthetic text — every task's
  prompt and answer with the image left out, reports and QA included — with a fixed word-level tokenizer that
  covers every word the generator can emit (`VOCABULARY`).

Both are saved with ``save_pretrained`` (``vision_encoder/``, ``llm/`` with its tokenizer), the folders
``build_hf_clip(path=...)``, ``build_hf_causal_lm(path=...)`` and the pretrained tokenizer load. `probe_table`
measures what the encoder's features carry: a linear probe per attribute on held-out images, random-init vs
pretrained, written to ``probes.json``.

Modules: `config` (architectures, label sets, budgets, schedule), `scenes` (the labelled synthetic images),
`encoder`, `llm`, `probes`; `pretrain` here runs them in order and writes ``pretrain.json``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cmoe.checkpointing import atomic_write
from cmoe.reference_models.unimed.config import PRETRAINED_DIR
from cmoe.reference_models.unimed.training.pretrain.config import (
    ENCODER_CONFIG,
    LLM_CONFIG,
    PretrainConfig,
    pretrain_config,
)
from cmoe.reference_models.unimed.training.pretrain.encoder import build_encoder, train_encoder
from cmoe.reference_models.unimed.training.pretrain.llm import build_tokenizer, train_llm
from cmoe.reference_models.unimed.training.pretrain.probes import (
    format_probe_table,
    probe_accuracies,
    probe_sets,
    probe_table,
)
from cmoe.reference_models.unimed.training.pretrain.scenes import SceneSet, make_scene_set

__all__ = ["ENCODER_CONFIG", "LLM_CONFIG", "PretrainConfig", "SceneSet", "build_encoder", "build_tokenizer",
           "format_probe_table", "make_scene_set", "pretrain", "pretrain_config", "probe_accuracies", "probe_sets",
           "probe_table", "train_encoder", "train_llm"]


def pretrain(out: str | Path | None = None, config: PretrainConfig | None = None, log=print,
             probes: bool = True) -> dict[str, Any]:
    """Pretrain the tiny encoder and LLM, save them under `out` (``vision_encoder/``, ``llm/``) with
    ``pretrain.json`` (budgets, seeds, timings, the probe table). Returns that record."""
    config = config or PretrainConfig()
    out = Path(out or PRETRAINED_DIR)
    torch.manual_seed(config.seed)
    record: dict[str, Any] = {"config": asdict(config), "seconds": {}}
    started = time.perf_counter()
    data = make_scene_set(config.encoder_images, config.data_seed, 0, config.image_size)
    record["seconds"]["encoder_data"] = time.perf_counter() - started
    started = time.perf_counter()
    encoder = train_encoder(config, data, log)
    record["seconds"]["encoder"] = time.perf_counter() - started
    encoder.save_pretrained(out / "vision_encoder")
    started = time.perf_counter()
    tokenizer = build_tokenizer()
    llm, losses = train_llm(config, tokenizer, log)
    record["seconds"]["llm"] = time.perf_counter() - started
    tail = max(1, len(losses) // 10)
    record["llm_loss"] = {"first": losses[0], "last_tenth_mean": float(np.mean(losses[-tail:]))}
    llm.save_pretrained(out / "llm")
    tokenizer.save_pretrained(out / "llm")
    if probes:
        started = time.perf_counter()
        record["probes"] = probe_table(encoder, config)
        record["seconds"]["probes"] = time.perf_counter() - started
        log(format_probe_table(record["probes"]))
    text = json.dumps(record, indent=2) + "\n"
    atomic_write(out / "pretrain.json", lambda tmp: Path(tmp).write_text(text))  # written last: the run's end mark
    return record
