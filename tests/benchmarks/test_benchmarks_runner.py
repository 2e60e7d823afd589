"""The benchmark runner and cases: every implementation runs, ratios are consistent, and all do identical work."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

from cmoe.benchmarks import cases, run, tables

HF_IMPORTABLE = cases.hf_import_error() is None


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict], Path]:
    out = tmp_path_factory.mktemp("bench") / "r.md"
    rows = run.main(["--quick", "--device", "cpu", "--out", str(out)])
    return rows, out


def test_quick_run_times_every_implementation(quick_run: tuple[list[dict], Path]) -> None:
    rows, _ = quick_run
    for case in cases.quick_cases():
        measured = {row["impl"]: row for row in rows if row["case"] == case.name}
        # timed on CUDA only; skipped with a note on CPU
        cuda_only = {"triton", cases.TORCH_GROUPED_MM, *cases.PEER_NAMES}
        assert set(measured) == set(case.implementations) - cuda_only, case.name
        for row in measured.values():
            for mode in cases.MODES:
                assert math.isfinite(row[f"{mode}_ms"]) and row[f"{mode}_ms"] > 0


@pytest.mark.skipif(not HF_IMPORTABLE, reason="transformers' NemotronHExperts not importable")
def test_quick_run_includes_square_hf_case(quick_run: tuple[list[dict], Path]) -> None:
    rows, _ = quick_run
    hf_cases = [case for case in cases.quick_cases() if case.hf]
    assert hf_cases and all(case.in_features == case.out_features for case in hf_cases)
    impls = {row["impl"] for row in rows if row["hf"]}
    assert set(cases.HF_IMPLEMENTATIONS) <= impls


def test_ratios_are_relative_to_the_roofline(quick_run: tuple[list[dict], Path]) -> None:
    rows, _ = quick_run
    for case in cases.quick_cases():
        case_rows = [row for row in rows if row["case"] == case.name]
        roofline = next(row for row in case_rows if row["impl"] == cases.ROOFLINE)
        for row in case_rows:
            for mode in cases.MODES:
                expected = row[f"{mode}_ms"] / roofline[f"{mode}_ms"]
                assert row[f"{mode}_x_roofline"] == pytest.approx(expected)
            assert row["gflops_forward"] == pytest.approx(case.flops / row["forward_ms"] / 1e6)
        assert roofline["forward_x_roofline"] == 1.0 and roofline["forward_backward_x_roofline"] == 1.0


def test_report_file_has_header_and_tables(quick_run: tuple[list[dict], Path]) -> None:
    _, out = quick_run
    text = out.read_text()
    assert "- Device: CPU: " in text
    assert "- Command: `python -m cmoe.benchmarks.run --quick" in text
    for case in cases.quick_cases():
        assert f"### `{case.name}`" in text
    assert "- `triton` skipped: the fused kernels are timed on CUDA only" in text
    assert "- `torch_grouped_mm` skipped: needs CUDA, bf16" in text
    for name in cases.PEER_NAMES:
        assert f"- `{name}` skipped: " in text and "CUDA only" in text
    assert "- `auto` (forward) picked " in text and "- `auto` (forward+backward) picked " in text
    assert "| case | mode | auto picked | fastest pickable |" in text


def test_auto_rows_name_the_backend_auto_picked(quick_run: tuple[list[dict], Path]) -> None:
    rows, _ = quick_run
    for row in (row for row in rows if row["impl"] == "auto"):
        for mode in cases.MODES:
            assert row[f"{mode}_pick"] in {"sorted", "grouped_mm", "dense"}


def test_auto_table_compares_the_pick_with_the_fastest_of_the_run() -> None:
    def row(impl: str, ms: float, pick: str | None = None) -> dict:
        found = {"impl": impl, "case": "c", "forward_ms": ms, "forward_backward_ms": 2 * ms}
        if pick:
            found.update(forward_pick=pick, forward_backward_pick=pick)
        return found
    rows = [row(cases.ROOFLINE, 1.0), row("sorted", 2.0), row("grouped_mm", 2.1), row("auto", 2.1, "grouped_mm"),
            row("hf_grouped_mm", 1.5)]
    lines = tables.auto_table(rows)
    assert "| `c` | forward | `grouped_mm` | `sorted` | 1.05 | `hf_grouped_mm` | 1.40 | 2.00 |" in lines
    assert "| `c` | forward+backward | `grouped_mm` | `sorted` | 1.05 | `hf_grouped_mm` | 1.40 | 2.00 |" in lines


@pytest.mark.parametrize("case", cases.quick_cases(), ids=lambda case: case.name)
def test_every_implementation_matches_loop(case: cases.Case) -> None:
    workload = cases.build_workload(case, "cpu")
    reference = cases.reference_output(workload)
    for name in workload.implementations:
        if name == cases.ROOFLINE:
            continue
        for mode in cases.MODES:
            out = cases.make_callable(workload, name, mode)()
            assert cases.relative_error(out, reference) <= cases.AGREEMENT_RTOL[case.dtype], (name, mode)


def test_forward_backward_fills_grads_of_inputs_weights_and_routing() -> None:
    case = next(c for c in cases.quick_cases() if c.kind == "mlp" and not c.hf)
    workload = cases.build_workload(case, "cpu")
    cases.make_callable(workload, "sorted", "forward_backward")()
    leaves = [workload.x, workload.weight, *workload.experts.parameters()]
    assert all(leaf.grad is not None and torch.isfinite(leaf.grad).all() for leaf in leaves)


def test_roofline_does_the_routed_flops() -> None:
    for case in cases.quick_cases():
        workload = cases.build_workload(case, "cpu")
        rows, *weights = workload.roofline_tensors
        flops = 2 * rows.shape[0] * sum(w.shape[0] * w.shape[1] for w in weights)
        assert flops == case.flops


def test_summary_ratios_come_from_the_headline_rows() -> None:
    def row(impl: str, ms: float) -> dict:
        return {"impl": impl, "case": "c", "headline": True, "hf": False, "forward_ms": ms,
                "forward_backward_ms": 3 * ms, "gflops_forward": 10 / ms}
    text = tables.summary([row("sorted", 2.0), row("every_expert", 8.0), row(cases.ROOFLINE, 1.0)])
    assert "`every_expert` (original Uni-Med), `c`: forward 4.00×, forward+backward 4.00×" in text
    assert "(1.0 = roofline), `c`: forward 2.00×, forward+backward 2.00×" in text
    assert "`hf_eager` (HF NemotronHExperts, same weights): not measured" in text


def test_summary_reports_triton_against_the_targets() -> None:
    def row(impl: str, ms: float, case: str = "c") -> dict:
        return {"impl": impl, "case": case, "headline": True, "hf": False, "forward_ms": ms,
                "forward_backward_ms": 2 * ms, "gflops_forward": 10 / ms, "forward_peak_mib": 5.0,
                "forward_backward_peak_mib": 9.0}
    case = cases.Case(1024, 64, 32, 8, 2, "mlp", dtype=torch.bfloat16)
    rows = [row("triton", 2.0, case.name), row("sorted", 3.0, case.name), row(cases.ROOFLINE, 1.8, case.name)]
    text = tables.summary(rows, {case.name: case})
    assert (f"- `triton` on `{case.name}`: roofline fraction (roofline time ÷ triton time) forward 0.90, "
            "forward+backward 0.90 (target ≥ 0.85)") in text
    assert "speed-up over `sorted` forward 1.50×, forward+backward 1.50× (target ≥ 1.2×)" in text
    assert "peak memory forward 5 MiB, forward+backward 9 MiB (a [T·k, in] copy of x would be 0 MiB)" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given where there is no GPU")
def test_kernel_probe_says_it_needs_a_gpu() -> None:
    import subprocess

    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-m", "cmoe.benchmarks.probe_triton", "e2e"], cwd=root, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 1
    assert "needs" not in done.stdout and "CUDA GPU; none is available here" in done.stderr
