"""The fused kernels on a CUDA GPU at real sizes (skipped without one): the random matrix in fp32 (TF32 off)
and bf16, every tuning candidate, a >2³¹-element case for the 64-bit offsets, CUDA-graph capture and no host
sync in a warmed-up step, and the connector step under ``torch.compile`` (inductor)."""

from __future__ import annotations

import pytest
import torch

import cmoe
from dispatch_cases import DispatchCase, build, max_relative_error, random_cases, run

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
pytest.importorskip("triton")

CASES = random_cases(24, seed=99, max_tokens=3000, max_width=700) + [
    DispatchCase(4096, 1408, 2048, 8, 2, "mlp", routing="random"),
    DispatchCase(8192, 5632, 4096, 8, 2, "mlp", routing="skewed"),
    DispatchCase(4096, 1408, 2048, 4, 1, "linear", routing="one_expert"),
]
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


@pytest.fixture(autouse=True)
def _no_tf32_no_tuning(monkeypatch):
    """fp32 compared without TF32 (as torch's default matmul); the default config (tuning is tested apart)."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setenv("CMOE_TRITON_AUTOTUNE", "0")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_kernels_match_loop_on_gpu(case: DispatchCase, dtype: torch.dtype) -> None:
    tensors = build(case, "cuda", seed=len(case.id))
    got = run(*tensors, backend="triton_kernels", dtype=dtype)
    ref = run(*tensors, backend="loop", dtype=torch.float32)
    error, which = max_relative_error(got, ref)
    allowed = TOLERANCE[dtype]
    if dtype != torch.float32:  # bf16 rounding of hidden activations alone can exceed it (k = 7, ReLU: 3.9%)
        allowed = max(allowed, 1.5 * max_relative_error(run(*tensors, backend="sorted", dtype=dtype), ref)[0])
    assert error < allowed, f"tensor #{which} off by {error:.2e} (allowed {allowed:.2e})"


@pytest.mark.parametrize("role", ["forward", "backward_input", "weight_grad"])
def test_every_tuning_candidate_is_correct(role: str) -> None:
    from cmoe.kernels import tuning

    case = DispatchCase(3000, 1408, 1000, 8, 2, "mlp", routing="random")
    tensors = build(case, "cuda", seed=3)
    ref = run(*tensors, backend="loop", dtype=torch.float32)
    block_m = tuning.default_block_m(case.tokens * case.top_k, case.num_experts, False)
    try:
        for config in tuning.candidates(role, block_m, 2, gather=True):
            tuning.pin_config(role, block_n=config.block_n, block_k=config.block_k, num_warps=config.num_warps,
                              num_stages=config.num_stages, stage_rows=config.stage_rows,
                              tma_weight=config.tma_weight, persistent=config.persistent)
            error, which = max_relative_error(run(*tensors, backend="triton_kernels", dtype=torch.bfloat16), ref)
            assert error < TOLERANCE[torch.bfloat16], f"{config}: tensor #{which} off by {error:.2e}"
    finally:
        tuning.pin_config(role)


@pytest.mark.slow
def test_large_token_count_past_32_bit_offsets() -> None:
    """600k tokens × 4096 features: row × width passes 2³¹ in x, dx and the output."""
    tokens, width, out_width = 600_000, 4096, 256
    assert tokens * width > 2**31
    experts = cmoe.LinearExperts(4, width, out_width).cuda().bfloat16()
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(tokens, width, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
    scores, index = torch.randn(tokens, 4, device="cuda", generator=gen).topk(2)
    weight = scores.softmax(-1).bfloat16().requires_grad_()
    out = cmoe.moe_project(x, experts, index, weight, backend="triton")
    grad = torch.randn_like(out)
    out.backward(grad)
    tail = torch.arange(tokens - 4096, tokens, device="cuda")  # rows whose offsets only fit in 64 bits
    head = torch.arange(0, 4096, device="cuda")
    for rows in (head, tail):
        xs = x.detach()[rows].float().requires_grad_()
        ws = weight.detach()[rows].float().requires_grad_()
        ref_experts = cmoe.LinearExperts(4, width, out_width).cuda()
        ref_experts.load_state_dict({k: v.float() for k, v in experts.state_dict().items()})
        ref = cmoe.moe_project(xs, ref_experts, index[rows], ws, backend="loop")
        ref.backward(grad[rows].float())
        torch.testing.assert_close(out[rows].float(), ref, rtol=3e-2, atol=3e-2)
        torch.testing.assert_close(x.grad[rows].float(), xs.grad, rtol=3e-2, atol=3e-2)
        torch.testing.assert_close(weight.grad[rows].float(), ws.grad, rtol=3e-2, atol=5e-2)


def _connector_step(connector, x, target):
    out = connector(x)
    loss = torch.nn.functional.mse_loss(out.hidden_states.float(), target) + out.aux_loss
    loss.backward()
    # Detached: a loss that keeps its graph alive keeps the parameters' AccumulateGrad nodes (and the stream
    # they were made on) alive, and a later capture on another stream then fails on the legacy stream.
    return loss.detach()


def test_warm_step_has_no_host_sync_and_captures_in_a_cuda_graph() -> None:
    torch.manual_seed(0)
    config = cmoe.CMoEConfig(in_features=1408, out_features=2048, num_experts=8, top_k=2, backend="triton",
                             check_finite=False)
    connector = cmoe.CMoEConnector(config).cuda().bfloat16()
    x = torch.randn(8, 256, 1408, device="cuda", dtype=torch.bfloat16)
    target = torch.randn(8, 256, 2048, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # warm-up: compile and (if enabled) tune outside the capture
            connector.zero_grad(set_to_none=False)
            _connector_step(connector, x, target)
    torch.cuda.current_stream().wait_stream(side)
    connector.zero_grad(set_to_none=False)
    torch.cuda.set_sync_debug_mode("error")
    try:
        eager_loss = _connector_step(connector, x, target)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    eager_grads = [p.grad.clone() for p in connector.parameters()]
    connector.zero_grad(set_to_none=False)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = _connector_step(connector, x, target)
    connector.zero_grad(set_to_none=False)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(static_loss, eager_loss, rtol=1e-3, atol=1e-3)
    for p, ref in zip(connector.parameters(), eager_grads):
        torch.testing.assert_close(p.grad, ref, rtol=2e-2, atol=2e-2)


def test_connector_step_compiles_with_inductor_like_eager() -> None:
    """``torch.compile`` (inductor, CUDA) around a connector with the fused kernels: one graph, eager's results."""
    torch.manual_seed(0)
    config = cmoe.CMoEConfig(in_features=1408, out_features=2048, num_experts=8, top_k=2, backend="triton",
                             check_finite=False, load_balance_coef=0.01)
    connector = cmoe.CMoEConnector(config).cuda().bfloat16()
    x = torch.randn(4, 256, 1408, device="cuda", dtype=torch.bfloat16)
    target = torch.randn(4, 256, 2048, device="cuda")

    def step(module) -> list[torch.Tensor]:
        connector.zero_grad(set_to_none=True)
        loss = _connector_step(module, x, target)
        return [loss.detach(), *[p.grad.float().clone() for p in connector.parameters()]]

    eager = step(connector)
    compiled = torch.compile(connector, fullgraph=True)
    step(compiled)  # compile and tune
    got = step(compiled)
    for a, b in zip(got, eager, strict=True):
        torch.testing.assert_close(a.float(), b.float(), rtol=3e-2, atol=3e-2)
