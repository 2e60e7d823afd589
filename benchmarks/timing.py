"""Timing of one benchmark case: every implementation called round-robin on the same inputs, the median time per
call, its spread and (CUDA) peak memory, and the ratios to the same-FLOPs dense matmul (the roofline row)."""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable

import torch

from cmoe.auto import default_timer
from cmoe.benchmarks.cases import MODES, ROOFLINE, Case, auto_choice, build_workload, is_headline, make_callable

__all__ = ["add_ratios", "measure_case", "measure_interleaved"]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _elapsed_ms(fn: Callable[[], torch.Tensor], device: torch.device) -> float:
    return default_timer("", fn, device)


def _peak_mib(fn: Callable[[], torch.Tensor], device: torch.device) -> float | None:
    """Peak extra CUDA memory of one call of `fn` (None on CPU)."""
    if device.type != "cuda":
        return None
    clear = getattr(fn, "clear_grads", None)
    if clear is not None:  # else the previous call's grads, freed inside fn, would count below the baseline
        clear()
    _synchronize(device)
    baseline = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    _synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - baseline) / 2**20


def measure_interleaved(fns: dict[str, Callable[[], torch.Tensor]], device: torch.device,
                        args: argparse.Namespace) -> tuple[dict[str, dict], dict[str, str]]:
    """Time every implementation of one case round-robin, reversing the order each round, so a drift in the
    machine's speed hits all of them alike (timing them one after another turned ±5% drift into fake gaps).

    Each gets ``--warmup`` untimed calls, then at least ``--repeats`` timed calls, more (up to
    ``--max-repeats``) while they add up to less than ``--min-time`` seconds. Returns per implementation the
    median ms, the spread (max − min) / median, the call count and (CUDA) peak MiB; and the failures.
    """
    failed: dict[str, str] = {}
    live: dict[str, Callable[[], torch.Tensor]] = {}
    for name, fn in fns.items():
        try:
            for _ in range(args.warmup):
                fn()
            live[name] = fn
        except Exception as exc:  # one implementation failing must not lose the rest of the run
            failed[name] = f"{type(exc).__name__}: {exc}"
    _synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in live}

    def wants_more(name: str) -> bool:
        done = times[name]
        return len(done) < args.repeats or (sum(done) < args.min_time * 1e3 and len(done) < args.max_repeats)

    rounds = 0
    while any(wants_more(name) for name in live):
        order = list(live) if rounds % 2 == 0 else list(live)[::-1]
        for name in order:
            if wants_more(name):
                times[name].append(_elapsed_ms(live[name], device))
        rounds += 1
    results = {}
    for name, fn in live.items():
        median = statistics.median(times[name])
        results[name] = {"ms": median, "spread": (max(times[name]) - min(times[name])) / median,
                         "calls": len(times[name]), "peak_mib": _peak_mib(fn, device)}
    return results, failed


def measure_case(case: Case, device: torch.device, args: argparse.Namespace) -> tuple[list[dict], list[str]]:
    """One row per implementation that ran on `case`, and notes on those skipped or failed."""
    workload = build_workload(case, device)
    notes = [f"`{name}` skipped: {reason}" for name, reason in workload.skipped.items()]
    left_out = {name for name in args.skip.split(",") if name} | ({"loop"} if args.skip_loop else set())
    names = [n for n in workload.implementations if n not in left_out]
    timings: dict[str, dict[str, dict]] = {}
    failures: dict[str, str] = {}
    for mode in MODES:
        fns = {name: make_callable(workload, name, mode) for name in names if name not in failures}
        timings[mode], failed = measure_interleaved(fns, device, args)
        failures.update(failed)
    notes += [f"`{name}` failed: {reason}" for name, reason in failures.items()]
    notes += [note for name, note in workload.notes.items() if name in names and name not in failures]
    picks = {mode: auto_choice(workload, mode) for mode in MODES} if "auto" in names else {}
    for mode, choice in picks.items():
        if choice is not None:
            notes.append(f"`auto` ({mode.replace('_', '+')}) picked {choice.explain()}")
    rows = []
    for name in names:
        if name in failures:
            continue
        row = {"case": case.name, "impl": name, "flops": case.flops, "headline": is_headline(case), "hf": case.hf,
               "dense_routing": case.top_k == case.num_experts}
        for mode in MODES:
            row.update({f"{mode}_{key}": value for key, value in timings[mode][name].items()})
            if name == "auto" and picks.get(mode) is not None:
                row[f"{mode}_pick"] = picks[mode].backend
        rows.append(row)
        print(f"  {name:<22} fwd {row['forward_ms']:10.3f} ms   fwd+bwd {row['forward_backward_ms']:10.3f} ms",
              file=sys.stderr, flush=True)
    add_ratios(rows)
    return rows, notes


def add_ratios(rows: list[dict]) -> None:
    """Add ``× roofline`` ratios (time / the roofline row's time) and useful forward GFLOP/s to each row."""
    roofline = next((row for row in rows if row["impl"] == ROOFLINE), None)
    for row in rows:
        row["gflops_forward"] = row["flops"] / (row["forward_ms"] * 1e-3) / 1e9
        for mode in MODES:
            row[f"{mode}_x_roofline"] = row[f"{mode}_ms"] / roofline[f"{mode}_ms"] if roofline else None
