"""Time every implementation in `cmoe.benchmarks.cases` on every case and print Markdown tables.

``python -m cmoe.benchmarks.run [--quick] [--repeats N] [--cases SUBSTRING] [--out PATH]``

This module is the command line; the timing is `cmoe.benchmarks.timing`, the Markdown report (what each column
means) `cmoe.benchmarks.tables`, and the targets it is read against `cmoe.benchmarks.targets`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from cmoe.auto import configure_auto
from cmoe.benchmarks.cases import Case, default_cases, quick_cases
from cmoe.benchmarks.tables import case_table, header, summary, tuned_configs
from cmoe.benchmarks.timing import measure_case
from cmoe.checkpointing import atomic_write


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


def select_cases(args: argparse.Namespace, device: torch.device) -> list[Case]:
    """The quick or full case list for `device`, filtered by ``--cases``."""
    cases = quick_cases() if args.quick else default_cases(device)
    wanted = args.cases.split(",")
    return [case for case in cases if any(part in case.name for part in wanted)]


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


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
