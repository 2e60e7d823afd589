"""The ``grouped_mm`` backend beyond the shared loop-comparison matrix of `test_dispatch.py`: what torch's op does
and does not support, the padding of unaligned widths, no host sync, and ``torch.compile(fullgraph=True)``."""

from __future__ import annotations

import pytest
import torch

import cmoe
from cmoe import CMoEError
from cmoe.kernels import grouped_mm
from dispatch_cases import DispatchCase, assert_compiled_step_matches_eager, build, max_relative_error, run
from test_no_host_sync import _connector, _record_step

pytestmark = pytest.mark.skipif(grouped_mm.GROUPED_MM is None, reason="this torch has no grouped_mm")


def test_is_available_on_cpu_and_says_why_not_elsewhere() -> None:
    backend = cmoe.BACKENDS.get("grouped_mm")
    assert backend.is_available("cpu") and backend.unavailable_reason("cpu") is None
    assert "runs on CPU and CUDA, not meta" in backend.unavailable_reason("meta")


def test_uses_torch_public_grouped_mm_where_it_exists() -> None:
    public = getattr(torch.nn.functional, "grouped_mm", None)
    assert grouped_mm.GROUPED_MM is (public or torch._grouped_mm)


@pytest.mark.parametrize("case", [
    DispatchCase(1, 16, 8, 4, 2, "mlp"),                                  # one token
    DispatchCase(40, 16, 24, 4, 1, "linear", routing="one_expert"),      # every token to one expert
    DispatchCase(40, 32, 16, 8, 2, "mlp", routing="skewed"),             # half the experts get nothing
    DispatchCase(40, 8, 8, 4, 4, "mlp", bias=False),                     # k = E
])
@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2), (torch.float16, 5e-3)])
def test_aligned_cases_match_loop_in_every_supported_dtype(case: DispatchCase, dtype: torch.dtype,
                                                           tolerance: float) -> None:
    """The reference is `loop` in float32; the low-precision tolerances are those of the other backends."""
    tensors = build(case, "cpu", seed=5)
    ref = run(*tensors, backend="loop", dtype=torch.float32)
    got = run(*tensors, backend="grouped_mm", dtype=dtype)
    assert got[0].dtype == dtype
    error, which = max_relative_error(got, ref)
    assert error < tolerance, f"tensor #{which} off by {error:.2e}"


def test_unaligned_widths_are_padded_not_refused() -> None:
    """Rows must span multiples of 16 bytes for torch's op; 13 → 7 → 5 floats do not, and still match loop."""
    case = DispatchCase(30, 13, 5, 3, 2, "mlp", hidden=7)
    tensors = build(case, "cpu", seed=1)
    with pytest.raises(RuntimeError, match="16 bytes"):  # what torch itself says about such rows
        grouped_mm.GROUPED_MM(torch.randn(6, 13), torch.randn(3, 13, 8), offs=torch.tensor([2, 4, 6],
                                                                                            dtype=torch.int32))
    error, which = max_relative_error(run(*tensors, backend="grouped_mm", dtype=torch.float32),
                                      run(*tensors, backend="loop", dtype=torch.float32))
    assert error < 1e-5, f"tensor #{which} off by {error:.2e}"


def test_float64_is_refused_with_a_clear_error() -> None:
    experts, x, index, weight, _ = build(DispatchCase(6, 8, 8, 3, 2, "mlp"), "cpu", 0, torch.float64)
    with pytest.raises(CMoEError, match="backend 'grouped_mm' cannot run these inputs: torch's grouped_mm "
                                        "supports float32, bfloat16, float16, not float64"):
        cmoe.moe_project(x, experts, index, weight, backend="grouped_mm")
    assert cmoe.moe_project(x, experts, index, weight).dtype == torch.float64  # auto skips it


@pytest.mark.parametrize("expert", ["linear", "mlp"])
def test_step_has_no_host_sync(expert: str, monkeypatch: pytest.MonkeyPatch) -> None:
    syncs = _record_step(_connector(backend="grouped_mm", expert=expert, in_features=16, out_features=16),
                         torch.randn(2, 20, 16), None, monkeypatch)
    assert syncs == [], f"the grouped_mm step would sync the host on a GPU: {syncs}"


@pytest.mark.parametrize("expert,in_features", [("mlp", 16), ("linear", 12)])
def test_compiles_fullgraph_in_bfloat16(expert: str, in_features: int) -> None:
    """torch.compile traces torch's grouped_mm in bfloat16 (its fake implementation checks the dtype)."""
    connector = cmoe.CMoEConnector(cmoe.CMoEConfig(
        in_features=in_features, out_features=16, num_experts=4, top_k=2, expert=expert, backend="grouped_mm",
        check_finite=False, load_balance_coef=0.01)).to(torch.bfloat16)
    assert_compiled_step_matches_eager(connector, torch.randn(2, 20, in_features, dtype=torch.bfloat16))


def test_compiling_float32_is_refused() -> None:
    connector = cmoe.CMoEConnector(cmoe.CMoEConfig(in_features=16, out_features=16, num_experts=4, top_k=2,
                                                   backend="grouped_mm", check_finite=False))
    with pytest.raises(Exception) as raised:
        torch.compile(connector, backend="aot_eager", fullgraph=True)(torch.randn(2, 20, 16))
    assert "bfloat16 only" in str(raised.value) or isinstance(raised.value.__cause__, CMoEError)


CUDA = torch.cuda.is_available()


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (benchmarks/gpu_session.sh tests)")
@pytest.mark.parametrize("case", [DispatchCase(4096, 512, 256, 8, 2, "mlp"), DispatchCase(1, 64, 64, 4, 2, "mlp"),
                                  DispatchCase(3000, 256, 128, 8, 2, "linear", routing="skewed")])
def test_cuda_bfloat16_matches_loop(case: DispatchCase) -> None:
    tensors = build(case, "cuda", seed=3)
    torch.backends.cuda.matmul.allow_tf32 = False
    ref = run(*tensors, backend="loop", dtype=torch.float32)
    error, which = max_relative_error(run(*tensors, backend="grouped_mm", dtype=torch.bfloat16), ref)
    assert error < 3e-2, f"tensor #{which} off by {error:.2e}"


@pytest.mark.skipif(not CUDA or torch.cuda.get_device_capability()[0] not in (9, 10),
                    reason="torch's sync-free grouped GEMM needs bf16 on compute capability 9.x/10.x")
def test_cuda_bfloat16_step_has_no_host_sync() -> None:
    connector = cmoe.CMoEConnector(cmoe.CMoEConfig(in_features=256, out_features=256, num_experts=8, top_k=2,
                                                   backend="grouped_mm", check_finite=False)).cuda().bfloat16()
    x = torch.randn(4, 512, 256, device="cuda", dtype=torch.bfloat16)
    connector(x).hidden_states.float().square().mean().backward()  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        connector(x).hidden_states.float().square().mean().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_auto_result_matches_loop() -> None:
    experts, x, index, weight, _ = build(DispatchCase(2048, 256, 256, 8, 2, "mlp"), "cuda", 0, torch.bfloat16)
    ref = cmoe.moe_project(x.float(), experts.float(), index, weight.float(), backend="loop")
    out = cmoe.moe_project(x, experts, index, weight)
    assert float((out.float() - ref).norm() / ref.norm()) < 3e-2


@pytest.mark.parametrize("bias", [True, False])
def test_autocast_bfloat16_matches_sorted_forward_and_backward(bias: bool) -> None:
    """Under CPU autocast (TRL's SFTTrainer turns bf16 autocast on) the bias mix came back in bf16 and
    ``index_add_`` refused the float32 rows; both backends must give the same float32 result and gradients."""
    results = {}
    for backend in ("sorted", "grouped_mm"):
        torch.manual_seed(0)
        connector = cmoe.CMoEConnector(cmoe.CMoEConfig(32, 64, num_experts=4, top_k=2, backend=backend,
                                                       expert="mlp", expert_bias=bias))
        x = torch.randn(2, 8, 32, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = connector(x).hidden_states
        out.float().square().mean().backward()
        results[backend] = (out, x.grad, connector.experts.layers[0][0].grad)
    assert results["grouped_mm"][0].dtype == results["sorted"][0].dtype
    error, worst = max_relative_error(list(results["grouped_mm"]), list(results["sorted"]))
    assert error < 3e-2, (error, worst)
