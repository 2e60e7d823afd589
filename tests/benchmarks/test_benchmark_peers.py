"""The benchmark's adapters of other projects' MoE kernels, run in Triton's CPU interpreter: each must compute
what its note in `cmoe.benchmarks.peers` says, forward and gradients, so that a peer's API change or a wrong call is
found here rather than in a GPU session. Liger-Kernel is a dev dependency; ScatterMoE is not on the package
index (build its wheel as `benchmarks/peer_wheels.sh` says), so its test runs only where it is installed."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from cmoe.benchmarks import peers
from cmoe.experts import StackedExperts

os.environ.setdefault("LIGER_FUSED_MOE_AUTOTUNE", "0")  # one config per kernel: the interpreter is slow
if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 on CPU (set by tests/conftest.py)", allow_module_level=True)

TOKENS, WIDTH, HIDDEN, EXPERTS, TOP_K = 19, 16, 24, 4, 2


def routing(seed: int = 0, tokens: int = TOKENS) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    weight, index = torch.randn(tokens, EXPERTS, generator=generator).softmax(-1).topk(TOP_K, dim=-1)
    index[0] = torch.arange(TOP_K)  # an expert that takes a token, and (with 4 experts) room for an empty one
    return weight.detach().requires_grad_(), index


def gradients(out: torch.Tensor, leaves: list[torch.Tensor], seed: int = 1) -> tuple[torch.Tensor, ...]:
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.dtype)
    return torch.autograd.grad(out, leaves, upstream)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm())


@pytest.mark.slow
def test_liger_fused_moe_adapter_computes_a_swiglu_moe_with_our_routing() -> None:
    pytest.importorskip("liger_kernel.ops.fused_moe")
    torch.manual_seed(0)
    x = torch.randn(TOKENS, WIDTH, requires_grad=True)
    weight, index = routing()
    experts = StackedExperts(EXPERTS, [WIDTH, HIDDEN, WIDTH])
    forward = peers._build_liger(x, experts, index, weight, TOP_K)
    gate_up, down = forward.leaves
    assert gate_up.shape == (EXPERTS, 2 * HIDDEN, WIDTH) and down.shape == (EXPERTS, WIDTH, HIDDEN)
    out = forward()

    def reference(x, gate_up, down, weight):  # SwiGLU experts, gate half first, float64
        x, gate_up, down, weight = (t.double() for t in (x, gate_up, down, weight))
        out = torch.zeros(TOKENS, WIDTH, dtype=torch.float64)
        for slot in range(TOP_K):
            chosen = index[:, slot]
            pre = torch.einsum("th,tnh->tn", x, gate_up[chosen])
            act = F.silu(pre[:, :HIDDEN]) * pre[:, HIDDEN:]
            out = out + weight[:, slot, None] * torch.einsum("tn,thn->th", act, down[chosen])
        return out

    leaves = [x, gate_up, down, weight]
    expected = reference(*leaves)
    assert relative(out, expected) < 1e-5
    for ours, theirs in zip(gradients(out, leaves), gradients(expected, leaves)):
        assert relative(ours, theirs) < 1e-5


@pytest.mark.parametrize("bias", [True, False])
def test_scattermoe_adapter_is_the_exact_case_with_our_weights(bias: bool) -> None:
    pytest.importorskip("scattermoe.mlp", reason="ScatterMoE is not on the package index; see peer_wheels.sh")
    from cmoe.dispatch import loop_backend

    torch.manual_seed(0)
    x = torch.randn(TOKENS, WIDTH, requires_grad=True)
    weight, index = routing()
    experts = StackedExperts(EXPERTS, [WIDTH, HIDDEN, WIDTH], bias=bias)
    forward = peers._build_scattermoe(x, experts, index, weight, TOP_K)
    out = forward()
    expected = loop_backend(x, experts, index, weight)
    assert relative(out, expected) < 1e-5
    theirs = gradients(out, [x, weight, *forward.leaves[1:]])  # ScatterMoE's order: w1, b1, w2, b2
    ours = gradients(expected, [x, weight, *(t for layer in experts.layers for t in layer if t is not None)])
    for a, b in zip(theirs, ours):
        assert a.shape == b.shape and relative(a, b) < 1e-5


def test_scattermoe_adapter_refuses_a_shape_it_cannot_run() -> None:
    with pytest.raises(ValueError, match="two-layer experts mapping back to the input width"):
        peers.scattermoe_module(StackedExperts(EXPERTS, [WIDTH, HIDDEN, WIDTH + 1]), TOP_K)
