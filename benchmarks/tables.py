"""The benchmark report in Markdown: the header (command, device, versions, method), one table per case, the
summary of headline ratios against the targets (`cmoe.benchmarks.targets`), `auto`'s picks, and the Triton block
configurations tuning chose.

Per case and implementation: the median forward and forward+backward times, both also as multiples of the
same-FLOPs dense matmul ("× roofline", 1.0 = as fast as a plain matmul doing the routed work), the useful
forward GFLOP/s (routed FLOPs / time, so implementations that compute every expert score lower), the spread of
the timed calls, and on CUDA the peak memory allocated above the case's inputs.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import shlex
import sys
from pathlib import Path

import torch

from cmoe.benchmarks.cases import BACKEND_IMPLEMENTATIONS, MODES, ROOFLINE, Case, cpu_cases, gpu_cases
from cmoe.benchmarks.targets import (
    AUTO_PICK_WITHIN,
    TRITON_COMPARED_WITH,
    TRITON_ROOFLINE_FRACTION,
    TRITON_SPEEDUP_TARGETS,
)

COLUMNS = ("impl", "fwd ms", "fwd+bwd ms", "fwd × roofline", "fwd+bwd × roofline", "GFLOP/s fwd",
           "timed calls fwd / fwd+bwd", "spread fwd / fwd+bwd", "peak MiB fwd / fwd+bwd")

__all__ = ["AUTO_PICKABLE", "COLUMNS", "auto_table", "case_table", "cpu_shapes_note", "device_description", "header",
           "summary", "tuned_configs"]


def device_description(device: torch.device) -> str:
    """The CUDA device name, or the CPU model from /proc/cpuinfo and torch's thread count."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU: {model}, torch.get_num_threads() = {torch.get_num_threads()}"


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if value >= 100:
        return f"{value:.0f}"
    return f"{value:.{digits}g}" if value < 1 else f"{value:.{digits - 1}f}"


def _memory(row: dict) -> str:
    if row["forward_peak_mib"] is None:
        return "n/a"
    return f"{row['forward_peak_mib']:.0f} / {row['forward_backward_peak_mib']:.0f}"


def case_table(case: Case, rows: list[dict], notes: list[str]) -> str:
    """The Markdown section for one case."""
    lines = [f"### `{case.name}`", "",
             f"{case.tokens} tokens, {case.in_features} → {case.out_features}, {case.num_experts} experts, "
             f"top-{case.top_k}, {case.kind} experts, bias={case.bias}, routed work {case.flops / 1e9:.3g} GFLOP",
             "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = [f"`{row['impl']}`", _fmt(row["forward_ms"]), _fmt(row["forward_backward_ms"]),
                 _fmt(row["forward_x_roofline"]), _fmt(row["forward_backward_x_roofline"]),
                 _fmt(row["gflops_forward"]), f"{row['forward_calls']} / {row['forward_backward_calls']}",
                 f"{row['forward_spread']:.0%} / {row['forward_backward_spread']:.0%}", _memory(row)]
        lines.append("| " + " | ".join(cells) + " |")
    if notes:
        lines += ["", *(f"- {note}" for note in notes)]
    return "\n".join(lines) + "\n"


def _ratio_line(rows: list[dict], label: str, numerator: str, denominator: str, hf: bool) -> str:
    found = {row["impl"]: row for row in rows if row["headline"] and row["hf"] == hf}
    if numerator not in found or denominator not in found:
        return f"- {label}: not measured in this run"
    top, bottom = found[numerator], found[denominator]
    ratios = [top[f"{mode}_ms"] / bottom[f"{mode}_ms"] for mode in MODES]
    return f"- {label}, `{top['case']}`: forward {ratios[0]:.2f}×, forward+backward {ratios[1]:.2f}×"


def _dense_routing_lines(rows: list[dict]) -> list[str]:
    """``dense`` vs ``sorted`` where every expert is active (k = E): the choice ``auto`` makes there."""
    lines = []
    for case in sorted({row["case"] for row in rows if row.get("dense_routing")}):
        found = {row["impl"]: row for row in rows if row["case"] == case}
        if "dense" in found and "sorted" in found:
            ratios = [found["sorted"][f"{mode}_ms"] / found["dense"][f"{mode}_ms"] for mode in MODES]
            lines.append(f"- `dense` speed-up over `sorted` under dense routing, `{case}`: "
                         f"forward {ratios[0]:.2f}×, forward+backward {ratios[1]:.2f}×")
    return lines


def _roofline_range(rows: list[dict]) -> str:
    rates = [row["gflops_forward"] for row in rows if row["impl"] == ROOFLINE]
    if not rates:
        return "- Dense-matmul roofline: not measured in this run"
    return (f"- Dense-matmul roofline forward throughput across cases: {min(rates):.0f}–{max(rates):.0f} GFLOP/s "
            "(a wide range means the machine's speed changed during the run: compare within a case)")


def _triton_lines(rows: list[dict], cases: dict[str, Case]) -> list[str]:
    """Per headline case: the fused kernels against the issue's targets (`cmoe.benchmarks.targets`), and their
    peak memory."""
    lines = []
    for name in sorted({row["case"] for row in rows if row["headline"]}):
        found = {row["impl"]: row for row in rows if row["case"] == name}
        if "triton" not in found:
            continue
        tri = found["triton"]
        parts = []
        if ROOFLINE in found:
            parts.append("roofline fraction (roofline time ÷ triton time) forward "
                         f"{found[ROOFLINE]['forward_ms'] / tri['forward_ms']:.2f}, forward+backward "
                         f"{found[ROOFLINE]['forward_backward_ms'] / tri['forward_backward_ms']:.2f} "
                         f"(target ≥ {TRITON_ROOFLINE_FRACTION:g})")
        for other in TRITON_COMPARED_WITH:
            if other in found:
                target = TRITON_SPEEDUP_TARGETS.get(other)
                parts.append(f"speed-up over `{other}` forward {found[other]['forward_ms'] / tri['forward_ms']:.2f}×, "
                             f"forward+backward {found[other]['forward_backward_ms'] / tri['forward_backward_ms']:.2f}×"
                             + (f" (target ≥ {target:g}×)" if target else ""))
        if tri.get("forward_peak_mib") is not None and name in cases:
            case = cases[name]
            copy_mib = case.tokens * case.top_k * case.in_features * case.dtype.itemsize / 2**20
            parts.append(f"peak memory forward {tri['forward_peak_mib']:.0f} MiB, forward+backward "
                         f"{tri['forward_backward_peak_mib']:.0f} MiB (a [T·k, in] copy of x would be {copy_mib:.0f} MiB)")
        lines.append(f"- `triton` on `{name}`: " + "; ".join(parts))
    return lines


AUTO_PICKABLE = tuple(name for name in BACKEND_IMPLEMENTATIONS if name not in ("auto", "loop"))


def _fastest(found: dict[str, dict], mode: str, names: tuple[str, ...] | None = None) -> str | None:
    timed = [n for n in found if n not in (ROOFLINE, "auto", "loop") and (names is None or n in names)]
    return min(timed, key=lambda n: found[n][f"{mode}_ms"]) if timed else None


def auto_table(rows: list[dict]) -> list[str]:
    """Per case and mode: auto's pick, the fastest backend it could pick and the fastest implementation of all
    (by this run's timings of each), the pick's time ÷ theirs (target `AUTO_PICK_WITHIN`), and the best pickable
    backend's time ÷ the same-FLOPs dense matmul."""
    lines = []
    for case in dict.fromkeys(row["case"] for row in rows):
        found = {row["impl"]: row for row in rows if row["case"] == case}
        auto_row = found.get("auto")
        for mode in MODES:
            pick = auto_row.get(f"{mode}_pick") if auto_row else None
            best, overall = _fastest(found, mode, AUTO_PICKABLE), _fastest(found, mode)
            if pick is None or pick not in found or best is None:
                continue
            ms = {name: found[name][f"{mode}_ms"] for name in (pick, best, overall)}
            roof = found[ROOFLINE][f"{mode}_ms"] if ROOFLINE in found else None
            lines.append(f"| `{case}` | {mode.replace('_', '+')} | `{pick}` | `{best}` | {ms[pick] / ms[best]:.2f} | "
                         f"`{overall}` | {ms[pick] / ms[overall]:.2f} | "
                         f"{'n/a' if roof is None else f'{ms[best] / roof:.2f}'} |")
    if not lines:
        return []
    return ["### `auto`'s picks", "",
            "Pick ÷ fastest = the time of the backend auto picked ÷ the fastest one's, both as timed in this run's "
            f"table (target ≤ {AUTO_PICK_WITHIN:g}; spread in the tables shows how much is noise). Best × roofline "
            "= the fastest pickable backend's time ÷ the same-FLOPs dense matmul's.", "",
            "| case | mode | auto picked | fastest pickable | pick ÷ fastest | fastest of all | pick ÷ fastest of all "
            "| best × roofline |", "|---|---|---|---|---|---|---|---|", *lines, ""]


def summary(rows: list[dict], cases: dict[str, Case] | None = None) -> str:
    """Headline ratios on the E=8, k=2 MLP cases, and how steady the machine was across cases."""
    cases = cases or {}
    lines = ["## Summary (E=8, k=2, MLP experts)", "",
             *_triton_lines(rows, cases), "",
             "Speed-up = the other implementation's time ÷ `sorted`'s time (> 1: `sorted` is faster).", "",
             _ratio_line(rows, "`sorted` speed-up over `every_expert` (original Uni-Med)",
                         "every_expert", "sorted", hf=False),
             _ratio_line(rows, "`sorted` speed-up over `hf_eager` (HF NemotronHExperts, same weights)",
                         "hf_eager", "sorted", hf=True),
             _ratio_line(rows, "`sorted` speed-up over `hf_grouped_mm` (same weights)",
                         "hf_grouped_mm", "sorted", hf=True),
             _ratio_line(rows, "`grouped_mm` speed-up over `hf_grouped_mm` (same weights)",
                         "hf_grouped_mm", "grouped_mm", hf=True),
             _ratio_line(rows, "`auto` speed-up over `hf_grouped_mm` (same weights)",
                         "hf_grouped_mm", "auto", hf=True),
             _ratio_line(rows, "`sorted` time ÷ same-FLOPs dense matmul time (1.0 = roofline)",
                         "sorted", ROOFLINE, hf=False),
             *_dense_routing_lines(rows),
             _roofline_range(rows), "", *auto_table(rows)]
    return "\n".join(lines) + "\n"


def header(argv: list[str], device: torch.device, args: argparse.Namespace, dtypes: str = "float32") -> str:
    """Command, device, versions, date and method: what a reader needs to reproduce the tables."""
    lines = ["# cmoe dispatch benchmarks", "",
             f"- Command: `python -m cmoe.benchmarks.run{' ' + shlex.join(argv) if argv else ''}`",
             f"- Device: {device_description(device)}",
             f"- torch {torch.__version__}{_transformers_version()}, Python {platform.python_version()}",
             f"- Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
             f"- Method: within a case, implementations are timed round-robin (order reversed each round, so a "
             f"drift in machine speed hits all alike); each gets {args.warmup} warm-up call(s), then the median "
             f"of at least {args.repeats} timed call(s), more (up to {args.max_repeats}) while they total under "
             f"{args.min_time:g} s; forward runs "
             "under `torch.no_grad()`; forward+backward is forward with grads on x, expert weights and routing "
             f"weights, then `out.sum().backward()`. dtype: {dtypes}.",
             "- `× roofline` = time ÷ `dense_matmul_roofline` time (plain dense matmuls doing the same FLOPs as "
             "the routed work); `GFLOP/s fwd` counts only the routed FLOPs; spread = (max − min) / median of "
             "the timed calls.",
             "- Peak memory is measured on CUDA only (n/a on CPU)." if device.type != "cuda" else
             "- Peak MiB = `torch.cuda.max_memory_allocated` above the memory held before the timed calls."]
    if device.type != "cuda" and not args.quick:
        lines.append(f"- {cpu_shapes_note()}")
    return "\n".join(lines) + "\n"


def _shape(case: Case) -> str:
    return f"{case.tokens} tokens × {case.in_features} → {case.out_features}"


def cpu_shapes_note() -> str:
    """Which full-size shapes the CPU cases stand in for, read off the case lists."""
    cpu, gpu = cpu_cases(), gpu_cases()
    cpu_hf = next(case for case in cpu if case.hf)
    return (f"CPU shapes ({_shape(cpu[0])}; HF-compatible cases {_shape(cpu_hf)}) are stand-ins sized for a "
            f"2-core CPU for Uni-Med's connector at ~8k visual tokens × 5632 → 4096, which the GPU shapes use "
            f"({_shape(gpu[0])}).")


def _transformers_version() -> str:
    try:
        import transformers
    except ImportError:
        return ""
    return f", transformers {transformers.__version__}"


def tuned_configs() -> str:
    """The block configurations the triton backend's tuning chose in this run (empty if it did not run)."""
    tuning = sys.modules.get("cmoe.kernels.tuning")
    choices = tuning.tuned_choices() if tuning is not None else {}
    if not choices:
        return ""
    lines = ["## Triton block configurations chosen by tuning", "",
             "| role, BLOCK_M, dtype, E, N, K, k>1, pairs bucket, flags | config |", "|---|---|"]
    for key, config in sorted(choices.items(), key=str):
        lines.append(f"| `{', '.join(map(str, key))}` | `{config}` |")
    return "\n".join(lines) + "\n"
