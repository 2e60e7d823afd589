"""Every dispatch backend against the `loop` reference: outputs and all gradients, many random shapes."""

from __future__ import annotations

import pytest
import torch

import cmoe
from cmoe import CMoEError, LinearExperts, MLPExperts, UnknownNameError, moe_project, select_backend
from dispatch_cases import ROUTINGS, DispatchCase, build, random_cases, run

BACKENDS_UNDER_TEST = ("sorted", "dense", "grouped_mm")
CASES = random_cases(120, seed=2024, max_tokens=64, max_width=129)


def test_random_cases_cover_the_edge_cases() -> None:
    assert any(c.tokens == 1 for c in CASES)
    assert any(c.in_features % 2 and c.out_features % 2 and c.in_features > 64 for c in CASES)
    assert {c.num_experts for c in CASES} >= {1, 2, 3, 8}
    assert any(c.top_k == c.num_experts == 8 for c in CASES)
    assert {c.routing for c in CASES} == set(ROUTINGS)
    assert {c.kind for c in CASES} == {"linear", "mlp"}
    assert any(not c.bias for c in CASES) and any(c.hidden is not None for c in CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_backends_match_loop(case: DispatchCase) -> None:
    tensors = build(case, "cpu", seed=len(case.id))
    ref = run(*tensors, backend="loop", dtype=torch.float32)
    assert torch.isfinite(ref[0]).all()
    for backend in BACKENDS_UNDER_TEST:
        got = run(*tensors, backend=backend, dtype=torch.float32)
        for which, (a, b) in enumerate(zip(got, ref, strict=True)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5,
                                       msg=lambda m: f"{backend}, tensor #{which} (0=out, 1=dx, 2=dw): {m}")


def test_loop_reference_matches_hand_written_formula() -> None:
    """The reference itself, checked against y[t] = Σ_j w[t,j]·(W[i[t,j]] x[t] + b[i[t,j]]) written out."""
    experts, x, index, weight, _ = build(DispatchCase(5, 4, 3, 3, 2, "linear", routing="duplicates"), "cpu", 7)
    (w, b), = experts.layers
    expected = torch.stack([
        sum(weight[t, j] * (w[index[t, j]] @ x[t] + b[index[t, j]]) for j in range(2)) for t in range(5)
    ])
    torch.testing.assert_close(moe_project(x, experts, index, weight, backend="loop"), expected.detach())


class Projector(torch.nn.Module):
    """`moe_project` as a module, so `functional_call` can feed expert weights in as gradcheck inputs."""

    def __init__(self, experts, index, backend):
        super().__init__()
        self.experts, self.index, self.backend = experts, index, backend

    def forward(self, x, weight):
        return moe_project(x, self.experts, self.index, weight, backend=self.backend)


@pytest.mark.parametrize("backend", ["sorted", "dense"])  # grouped_mm: no float64 in torch (see its tests)
@pytest.mark.parametrize("expert", ["linear", "mlp"])
def test_gradcheck_float64(backend: str, expert: str) -> None:
    experts, x, index, weight, _ = build(DispatchCase(6, 5, 4, 3, 2, expert), "cpu", 3, torch.float64)
    module = Projector(experts, index, backend)
    names = [n for n, _ in module.named_parameters()]

    def fn(x, weight, *params):
        return torch.func.functional_call(module, dict(zip(names, params)), (x, weight))

    params = [p.detach().clone().requires_grad_() for p in module.parameters()]
    assert len(params) == (2 if expert == "linear" else 4)
    assert torch.autograd.gradcheck(fn, (x.requires_grad_(), weight.requires_grad_(), *params), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 3e-2), (torch.float16, 5e-3)])
@pytest.mark.parametrize("backend", BACKENDS_UNDER_TEST)
def test_low_precision_close_to_float32_loop(backend: str, dtype: torch.dtype, tol: float) -> None:
    for seed in range(5):
        experts, x, index, weight, _ = build(DispatchCase(33, 37, 24, 4, 2, "mlp"), "cpu", seed)
        ref = moe_project(x, experts, index, weight, backend="loop")
        out = moe_project(x.to(dtype), experts.to(dtype), index, weight.to(dtype), backend=backend)
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), ref.detach(), rtol=tol, atol=tol)


def test_leading_dims_are_kept() -> None:
    experts = LinearExperts(3, 6, 5)
    x = torch.randn(2, 4, 6)
    index = torch.randint(3, (2, 4, 2))
    weight = torch.rand(2, 4, 2)
    out = moe_project(x, experts, index, weight)
    assert out.shape == (2, 4, 5)
    torch.testing.assert_close(out.reshape(8, 5), moe_project(x.reshape(8, 6), experts, index.reshape(8, 2),
                                                              weight.reshape(8, 2), backend="loop"))


def test_zero_tokens_give_empty_output() -> None:
    experts = MLPExperts(2, 4, 3)
    out = moe_project(torch.randn(0, 4), experts, torch.zeros(0, 1, dtype=torch.long), torch.zeros(0, 1))
    assert out.shape == (0, 3)


def test_table_rule_picks_sorted_on_cpu_whatever_the_routing() -> None:
    x = torch.randn(4, 8)
    assert select_backend(x, num_experts=4, top_k=4) == "sorted"  # measured faster than dense on CPU
    assert select_backend(x, num_experts=4, top_k=2) == "sorted"
    assert select_backend(x, num_experts=4, top_k=2, backend="loop") == "loop"


def test_unknown_backend_lists_known_ones() -> None:
    experts = LinearExperts(2, 4, 3)
    with pytest.raises(UnknownNameError, match=r"unknown backend 'fast'; known backends: auto, dense, grouped_mm, loop, sorted, triton"):
        moe_project(torch.randn(3, 4), experts, torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1),
                    backend="fast")


def test_triton_not_registered_says_how_to_get_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from cmoe.plugin_manager import reset_plugins

    monkeypatch.setenv("CMOE_DISABLE_PLUGINS", "triton_kernels")
    reset_plugins()
    try:
        assert "triton" not in cmoe.BACKENDS and "grouped_mm" not in cmoe.BACKENDS
        experts = LinearExperts(2, 4, 3)
        with pytest.raises(CMoEError, match="backend 'triton' is not loaded: reinstall cmoe so its `triton_kernels`"):
            moe_project(torch.randn(3, 4), experts, torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1),
                        backend="triton")
    finally:
        monkeypatch.delenv("CMOE_DISABLE_PLUGINS")
        reset_plugins()
    assert "triton" in cmoe.BACKENDS


@pytest.mark.parametrize("bad,match", [
    (dict(x=torch.randn(3, 5)), r"x: expected a \[\.\.\., 4\] tensor"),
    (dict(x=torch.ones(3, 4, dtype=torch.long)), "x: expected a floating-point tensor"),
    (dict(index=torch.zeros(3, 1)), "expert_index: expected an integer tensor"),
    (dict(index=torch.zeros(2, 1, dtype=torch.long)), r"expert_index: expected shape \[3, k\]"),
    (dict(index=torch.zeros(3, 3, dtype=torch.long), weight=torch.ones(3, 3)), "k in 1..num_experts=2"),
    (dict(index=torch.full((3, 1), 2)), r"expert_index: expected values in 0..1, got values in 2..2"),
    (dict(index=torch.full((3, 1), -1)), "expert_index: expected values in 0..1"),
    (dict(weight=torch.ones(3, 2)), r"expert_weight: expected shape \[3, 1\]"),
    (dict(weight=torch.ones(3, 1, dtype=torch.long)), "expert_weight: expected a floating-point tensor"),
])
def test_bad_inputs_raise_one_clear_error(bad: dict, match: str) -> None:
    args = dict(x=torch.randn(3, 4), index=torch.zeros(3, 1, dtype=torch.long), weight=torch.ones(3, 1))
    args.update(bad)
    with pytest.raises(CMoEError, match=match):
        moe_project(args["x"], LinearExperts(2, 4, 3), args["index"], args["weight"])


def test_experts_must_be_stacked_experts() -> None:
    with pytest.raises(CMoEError, match="experts: expected a cmoe StackedExperts"):
        moe_project(torch.randn(3, 4), torch.nn.Linear(4, 3), torch.zeros(3, 1, dtype=torch.long),
                    torch.ones(3, 1))
