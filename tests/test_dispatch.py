"""Every dispatch backend against the `loop` reference: outputs and all gradients, many random shapes."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
import torch

import cmoe
from cmoe import CMoEError, LinearExperts, MLPExperts, UnknownNameError, moe_project, select_backend

BACKENDS_UNDER_TEST = ("sorted", "dense")


@dataclass
class Case:
    tokens: int
    in_features: int
    out_features: int
    num_experts: int
    top_k: int
    expert: str
    bias: bool
    routing: str  # random | one_expert | some_empty | duplicates

    def build(self, seed: int, dtype: torch.dtype = torch.float32):
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        if self.expert == "linear":
            experts = LinearExperts(self.num_experts, self.in_features, self.out_features, bias=self.bias)
        else:
            experts = MLPExperts(self.num_experts, self.in_features, self.out_features,
                                 hidden_features=max(1, self.out_features // 2 + 3), bias=self.bias)
        experts = experts.to(dtype)
        x = torch.randn(self.tokens, self.in_features, generator=gen).to(dtype)
        scores = torch.randn(self.tokens, self.num_experts, generator=gen)
        if self.routing == "one_expert":
            index = torch.full((self.tokens, self.top_k), self.num_experts - 1)
        elif self.routing == "duplicates":
            index = torch.randint(self.num_experts, (self.tokens, self.top_k), generator=gen)
        else:
            if self.routing == "some_empty" and self.num_experts > self.top_k:
                scores[:, : self.num_experts - self.top_k] = -1e9  # those experts never get a token
            index = scores.topk(self.top_k, dim=-1).indices
        weight = torch.rand(self.tokens, self.top_k, generator=gen).to(dtype) + 0.1
        return experts, x, index, weight


def random_case(seed: int) -> Case:
    rng = random.Random(seed)
    num_experts = rng.choice([1, 2, 3, 8])
    return Case(
        tokens=rng.choice([1, 1, 2, 3, 7, 16, 33, 64]),
        in_features=rng.choice([1, 5, 8, 37, 64, 129]),
        out_features=rng.choice([1, 3, 16, 37, 129]),
        num_experts=num_experts,
        top_k=rng.randint(1, num_experts),
        expert=rng.choice(["linear", "mlp"]),
        bias=rng.random() < 0.7,
        routing=rng.choice(["random", "random", "one_expert", "some_empty", "duplicates"]),
    )


SEEDS = range(120)


def run_with_grads(backend: str, experts, x, index, weight):
    x = x.detach().clone().requires_grad_(True)
    weight = weight.detach().clone().requires_grad_(True)
    experts.zero_grad(set_to_none=True)
    out = moe_project(x, experts, index, weight, backend=backend)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
    (out * upstream).sum().backward()
    grads = {"x": x.grad, "expert_weight": weight.grad}
    grads.update({f"param:{n}": p.grad if p.grad is not None else torch.zeros_like(p)
                  for n, p in experts.named_parameters()})
    return out.detach(), grads


def test_random_cases_cover_the_edge_cases() -> None:
    cases = [random_case(s) for s in SEEDS]
    assert any(c.tokens == 1 for c in cases)
    assert any(c.in_features in (37, 129) and c.out_features in (37, 129) for c in cases)
    assert {c.num_experts for c in cases} == {1, 2, 3, 8}
    assert any(c.top_k == c.num_experts == 8 for c in cases)
    assert {c.routing for c in cases} == {"random", "one_expert", "some_empty", "duplicates"}
    assert {c.expert for c in cases} == {"linear", "mlp"}


@pytest.mark.parametrize("seed", SEEDS)
def test_backends_match_loop(seed: int) -> None:
    case = random_case(seed)
    experts, x, index, weight = case.build(seed)
    ref_out, ref_grads = run_with_grads("loop", experts, x, index, weight)
    assert torch.isfinite(ref_out).all()
    for backend in BACKENDS_UNDER_TEST:
        out, grads = run_with_grads(backend, experts, x, index, weight)
        torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5, msg=lambda m: f"{backend} {case}: {m}")
        for name, ref in ref_grads.items():
            torch.testing.assert_close(grads[name], ref, rtol=1e-4, atol=1e-5,
                                       msg=lambda m: f"{backend} grad {name} {case}: {m}")


def test_loop_reference_matches_hand_written_formula() -> None:
    """The reference itself, checked against y[t] = Σ_j w[t,j]·(W[i[t,j]] x[t] + b[i[t,j]]) written out."""
    experts, x, index, weight = Case(5, 4, 3, 3, 2, "linear", True, "duplicates").build(7)
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


@pytest.mark.parametrize("backend", ["sorted", "dense"])
@pytest.mark.parametrize("expert", ["linear", "mlp"])
def test_gradcheck_float64(backend: str, expert: str) -> None:
    experts, x, index, weight = Case(6, 5, 4, 3, 2, expert, True, "random").build(3, torch.float64)
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
        case = Case(33, 37, 24, 4, 2, "mlp", True, "random")
        experts, x, index, weight = case.build(seed)
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


def test_auto_picks_sorted_on_cpu_whatever_the_routing() -> None:
    x = torch.randn(4, 8)
    assert select_backend(x, num_experts=4, top_k=4) == "sorted"  # measured faster than dense on CPU
    assert select_backend(x, num_experts=4, top_k=2) == "sorted"
    assert select_backend(x, num_experts=4, top_k=2, backend="loop") == "loop"


def test_unknown_backend_lists_known_ones() -> None:
    experts = LinearExperts(2, 4, 3)
    with pytest.raises(UnknownNameError, match=r"unknown backend 'fast'; known backends: auto, dense, loop, sorted, triton"):
        moe_project(torch.randn(3, 4), experts, torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1),
                    backend="fast")


def test_triton_not_registered_says_how_to_get_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from cmoe.plugin_manager import reset_plugins

    monkeypatch.setenv("CMOE_DISABLE_PLUGINS", "triton_kernels")
    reset_plugins()
    try:
        assert "triton" not in cmoe.BACKENDS
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
