"""A few training steps of the ``paper`` model with random weights: step time and peak memory on one device.

``python -m cmoe.reference_models.unimed.paper.paper_step [--steps 5] [--batch-size 4] [--out result.json]``

Full size (EVA-CLIP ViT-g, the original connector, LLaMA-2-7B with LoRA r 8) is built on the meta device and
materialised on the GPU (`scale.materialize`): the frozen ViT in float16 and the LLM in float32 as the
original keeps them (`model.llm_upcast`; null keeps the LLM in float16), trainable weights in float32, fp16 autocast with a grad scaler, AdamW, gradient checkpointing, batch 4 of one
task, ``--text-tokens`` prompt and ``--answer-tokens`` answer tokens around the 64 visual tokens. The memory
estimate is printed before the first step; the result (device, step times, peak memory, estimate, parameter
counts) is printed, as a summary line and as JSON, and written to ``--out``. ``--dry-run`` runs the same path
at toy widths on the CPU in fp32.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from cmoe.reference_models.unimed.data.sample import Sample
from cmoe.reference_models.unimed.model.collate import IMAGE_TASKS, Batch, EncodedText, task_id
from cmoe.reference_models.unimed.model.memory import GiB, build_on_meta, estimate_memory
from cmoe.reference_models.unimed.paper.scale import materialize, parameter_counts, random_weight_config
from cmoe.checkpointing import atomic_write

DRY_RUN: dict[str, Any] = {
    "model": {"vision_encoder": {"options": {"config": {"img_size": 56, "embed_dim": 32, "depth": 2,
                                                        "num_heads": 2}}},
              "connector": {"options": {"expert_hidden": 48, "router_hidden": 64}},
              "llm": {"options": {"config": {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2,
                                             "num_attention_heads": 4, "num_key_value_heads": 4,
                                             "vocab_size": 500, "max_position_embeddings": 512}}},
              "dtype": "float32", "connector_autocast": None},
    "train": {"precision": "fp32"},
}
"""The paper's structure at toy widths (EVA 56 px → 16 tokens → 4 after the 1×4 reshape), for a CPU check."""


def random_batch(batch_size: int, text_tokens: int, answer_tokens: int, image_size: int, vocab: int,
                 task: str = "report", seed: int = 0) -> Batch:
    """A batch of one image task with random pixels and token ids: BOS + 4 tokens before the image, the rest
    of the prompt after it, then the answer."""
    generator = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(3, vocab, (n,), generator=generator).tolist()
    texts = [EncodedText([1, *ids(4)], ids(max(1, text_tokens - 5)), ids(answer_tokens), True)
             for _ in range(batch_size)]
    pixels = torch.randn(batch_size, 3, image_size, image_size, generator=generator)
    image = torch.zeros(image_size, image_size, 3, dtype=torch.uint8).numpy()  # only for the Sample's checks
    samples = [Sample(task=task, fields={}, answer="", image=image) for _ in range(batch_size)]
    return Batch(samples, texts, torch.full((batch_size,), task_id(task), dtype=torch.long), pixels)


def run(overrides: dict[str, Any] | None = None, steps: int = 5, warmup: int = 1, batch_size: int = 4,
        text_tokens: int = 192, answer_tokens: int = 64, device: str | None = None) -> dict[str, Any]:
    """Build, materialise and train `steps` steps (the first `warmup` untimed); returns the measurements."""
    from cmoe.reference_models.unimed.model.tokenizer import build_word_tokenizer
    from cmoe.reference_models.unimed.training.train import autocast, parameter_groups

    config = random_weight_config(overrides)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    half = config.model.dtype != "float32"
    tokenizer = build_word_tokenizer(["random weights"])
    started = time.perf_counter()
    model = build_on_meta(config, tokenizer)
    counts = parameter_counts(model)
    materialize(model, device, frozen_dtype=torch.float16 if half else None, seed=config.seed)
    if config.model.llm_upcast is not None:  # the original's LLM: loaded in fp16, its weights then cast to fp32
        model.llm.to(getattr(torch, config.model.llm_upcast))
    model.train()
    estimate = estimate_memory(model, batch_size, text_tokens + answer_tokens,
                               gradient_checkpointing=config.model.gradient_checkpointing)
    print(estimate.format(), flush=True)
    build_s = time.perf_counter() - started
    optimizer = torch.optim.AdamW(parameter_groups(model, config.train.weight_decay), lr=config.train.lr,
                                  betas=tuple(config.train.betas))
    scaler = torch.amp.GradScaler("cuda") if config.train.precision == "fp16" else None
    vocab = model.llm.model.get_input_embeddings().num_embeddings
    image_size = model.vision_encoder.image_size
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    times, losses = [], []
    for step in range(warmup + steps):
        batch = random_batch(batch_size, text_tokens, answer_tokens, image_size, vocab,
                             task=IMAGE_TASKS[step % len(IMAGE_TASKS)], seed=step).to(device)
        begin = time.perf_counter()
        with autocast(config.train.precision, device) if config.train.precision != "fp32" else nullcontext():
            loss = model(batch).loss
        (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize(device)
        if step >= warmup:
            times.append(time.perf_counter() - begin)
        losses.append(float(loss.detach()))
    result = {
        "device": torch.cuda.get_device_name(device) if cuda else f"CPU ({platform.processor() or platform.machine()})",
        "torch": torch.__version__, "precision": config.train.precision, "batch_size": batch_size,
        "sequence": {"visual": 64 if not overrides else None, "text": text_tokens, "answer": answer_tokens},
        "steps_timed": steps, "warmup_steps": warmup, "step_s_mean": statistics.fmean(times),
        "step_s_median": statistics.median(times), "step_s": times, "losses": losses, "build_s": build_s,
        "parameters": counts, "estimate_gib": {k: v / GiB for k, v in vars(estimate).items()} | {
            "total": estimate.total / GiB},
    }
    if cuda:
        result["peak_allocated_gib"] = torch.cuda.max_memory_allocated(device) / GiB
        result["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / GiB
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--text-tokens", type=int, default=192, help="prompt tokens besides the image (192)")
    parser.add_argument("--answer-tokens", type=int, default=64, help="answer tokens (64)")
    parser.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda if available)")
    parser.add_argument("--dry-run", action="store_true", help="toy widths on the CPU in fp32 (checks the path)")
    parser.add_argument("--out", help="write the result as JSON here")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if not args.dry_run and not torch.cuda.is_available() and args.device in (None, "cpu"):
        print("error: the paper-scale step needs a CUDA GPU (about 30 GB free); use --dry-run on a CPU", file=sys.stderr)
        return 2
    result = run(DRY_RUN if args.dry_run else None, args.steps, args.warmup, args.batch_size, args.text_tokens,
                 args.answer_tokens, "cpu" if args.dry_run else args.device)
    summary = (f"{result['device']}: {result['steps_timed']} steps of batch {result['batch_size']} "
               f"({result['precision']}), step {result['step_s_median']:.3f} s median")
    if "peak_allocated_gib" in result:
        summary += f", peak {result['peak_allocated_gib']:.2f} GiB allocated ({result['peak_reserved_gib']:.2f} reserved)"
    print(summary)
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(result, indent=1)
        atomic_write(args.out, lambda tmp: Path(tmp).write_text(text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
