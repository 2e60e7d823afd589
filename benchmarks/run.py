"""Time every implementation in `cmoe.benchmarks.cases` on every case and print Markdown tables.

``python -m cmoe.benchmarks.run [--quick] [--repeats N] [--cases SUBSTRING] [--out PATH]``

Per case and implementation: the median forward and forward+backward times (see `measure`), both also as
multiples of the same-FLOPs dense matmul ("× roofline", 1.0 = as fast as a plain matmul doing the routed
work), the useful forward GFLOP/s (routed FLOPs / time, so implementations that compute every expert score
lower), the spread of the timed calls, and on CUDA the peak memory allocated above the case's inputs.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from cmoe.benchmarks.cases import (
    BACKEND_IMPLEMENTATIONS,
    MODES,
    ROOFLINE,
    TORCH_GROUPED_MM,
    Case,
    build_workload,
    auto_choice,
    cpu_cases,
    default_cases,
    gpu_cases,
    is_headline,
    make_callable,
    quick_cases,
)
from cmoe.auto import configure_auto, default_timer

COLUMNS = ("impl", "fwd ms", "fwd+bwd ms", "fwd × roofline", "fwd+bwd × roofline", "GFLOP/s fwd",
           "timed calls fwd / fwd+bwd", "spread fwd / fwd+bwd", "peak MiB fwd / fwd+bwd")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command-line options (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m cmoe.benchmarks.run", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 1 repeat (for tests)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed calls per measurement (default 3 on CUDA, 2 on CPU to keep the full CPU run "
                             "near 10 minutes on 2 cores, 1 with --quick)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls before each measurement")
    parser.add_argument("--min-time", type=float, default=None,
                        help="keep timing cheap calls until they total this many seconds (default 1; 0 with --quick)")
    parser.add_argument("--max-repeats", type=int, default=10, help="cap on timed calls per measurement")
    parser.add_argument("--cases", default="",
                        help="only cases whose name contains this substring (or one of several, comma-separated)")
    parser.add_argument("--skip-loop", action="store_true", help="leave out the slow reference 'loop' backend")
    parser.add_argument("--skip", default="", help="comma-separated implementations to leave out")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--out", type=Path, default=None, help="also write the Markdown report here")
    return parser.parse_args(argv)


def resolve_defaults(args: argparse.Namespace) -> torch.device:
    """Pick the device and, unless given, the repeat count and minimum time for it; return the device."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3 if device.type == "cuda" else 2
    if args.min_time is None:
        args.min_time = 0.0 if args.quick else 1.0
    if args.repeats < 1 or args.warmup < 0 or args.min_time < 0:
        raise SystemExit("--repeats must be >= 1, --warmup >= 0 and --min-time >= 0")
    return device


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
    """Per headline case: the fused kernels against the issue's targets, and their peak memory."""
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
                         f"{found[ROOFLINE]['forward_backward_ms'] / tri['forward_backward_ms']:.2f} (target ≥ 0.85)")
        for other, target in (("sorted", "≥ 1.2"), ("grouped_mm", "≥ 1.2"), ("hf_grouped_mm", "≥ 1.5"),
                              (TORCH_GROUPED_MM, None), ("hf_eager", None)):
            if other in found:
                parts.append(f"speed-up over `{other}` forward {found[other]['forward_ms'] / tri['forward_ms']:.2f}×, "
                             f"forward+backward {found[other]['forward_backward_ms'] / tri['forward_backward_ms']:.2f}×"
                             + (f" (target {target}×)" if target else ""))
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
    (by this run's timings of each), the pick's time ÷ theirs (target ≤ 1.05), and the best pickable backend's
    time ÷ the same-FLOPs dense matmul."""
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
            "table (target ≤ 1.05; spread in the tables shows how much is noise). Best × roofline = the fastest "
            "pickable backend's time ÷ the same-FLOPs dense matmul's.", "",
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


def select_cases(args: argparse.Namespace, device: torch.device) -> list[Case]:
    """The quick or full case list for `device`, filtered by ``--cases``."""
    cases = quick_cases() if args.quick else default_cases(device)
    wanted = args.cases.split(",")
    return [case for case in cases if any(part in case.name for part in wanted)]


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


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the benchmarks, print the Markdown report (and write it to ``--out``), return the measured rows."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    device = resolve_defaults(args)
    configure_auto()  # auto measures afresh in this run (or reads $CMOE_AUTO_CACHE)
    started = time.perf_counter()
    sections, rows = [], []
    selected = select_cases(args, device)
    dtypes = ", ".join(sorted({str(case.dtype).removeprefix("torch.") for case in selected})) or "n/a"

    def report(done: bool) -> str:
        elapsed = time.perf_counter() - started
        footer = (f"Runner wall time: {elapsed:.0f} s.\n" if done else
                  f"Partial report: {len(sections)} of {len(selected)} cases after {elapsed:.0f} s.\n")
        return "\n".join([header(argv, device, args, dtypes), summary(rows, {c.name: c for c in selected}),
                          "## Cases", "", *sections, tuned_configs(), footer])

    for case in selected:
        print(f"{case.name}:", file=sys.stderr, flush=True)
        case_rows, notes = measure_case(case, device, args)
        rows += case_rows
        sections.append(case_table(case, case_rows, notes))
        if args.out is not None:  # after every case, so a run cut short still leaves its tables
            _write(args.out, report(done=False))
    final = report(done=True)
    print(final)
    if args.out is not None:
        _write(args.out, final)
    return rows


if __name__ == "__main__":
    main()
