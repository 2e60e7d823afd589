"""Seeded random dispatch cases shared by the backend tests (`test_dispatch.py`), the interpreter and GPU kernel
tests, and the comparison they make: output and every gradient against the `loop` reference."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

import cmoe
from cmoe.experts import StackedExperts

ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu")
# random: top-k of random scores; one_expert: every token's first choice is expert 0; skewed: the upper half of
# the experts only get tokens when k is large (empty experts); duplicates: a token may pick an expert twice.
ROUTINGS = ("random", "one_expert", "skewed", "duplicates")


@dataclass(frozen=True)
class DispatchCase:
    tokens: int
    in_features: int
    out_features: int
    num_experts: int
    top_k: int
    kind: str = "mlp"
    bias: bool = True
    activation: str = "gelu"
    routing: str = "random"
    hidden: int | None = None

    @property
    def id(self) -> str:
        return (f"{self.kind}-T{self.tokens}-{self.in_features}x{self.out_features}-E{self.num_experts}"
                f"k{self.top_k}-{self.routing}-{self.activation}{'' if self.bias else '-nobias'}"
                f"{'' if self.hidden is None else f'-h{self.hidden}'}")


def random_cases(count: int, seed: int, max_tokens: int, max_width: int) -> list[DispatchCase]:
    """`count` cases; the first few pin the edge cases (one token, k = E, one expert, empty experts, an expert
    picked twice, odd widths, hidden ≠ out)."""
    rng = random.Random(seed)
    odd = 97 if max_width >= 97 else 31
    fixed = [
        DispatchCase(1, 7, 5, 3, 2, "mlp"),
        DispatchCase(max_tokens, 19, 23, 4, 4, "mlp"),
        DispatchCase(max_tokens, 16, 16, 5, 1, "linear", routing="one_expert"),
        DispatchCase(max_tokens, 33, 17, 8, 2, "mlp", bias=False, activation="silu", routing="skewed"),
        DispatchCase(max_tokens // 2 + 1, 47, odd, 7, 3, "linear"),
        DispatchCase(max_tokens, 24, 20, 3, 2, "mlp", routing="one_expert", hidden=13),
        DispatchCase(max_tokens, 8, 8, 8, 8, "linear", routing="random"),
        DispatchCase(max_tokens // 3 + 1, 11, 13, 3, 3, "mlp", activation="relu", routing="duplicates"),
    ]
    cases = list(fixed)
    while len(cases) < count:
        experts = rng.choice([1, 2, 3, 4, 7, 8])
        cases.append(DispatchCase(
            tokens=rng.randint(1, max_tokens), in_features=rng.randint(1, max_width),
            out_features=rng.randint(1, max_width), num_experts=experts, top_k=rng.randint(1, experts),
            kind=rng.choice(["linear", "mlp"]), bias=rng.random() < 0.8, activation=rng.choice(ACTIVATIONS),
            routing=rng.choice(["random", "random", *ROUTINGS[1:]]),
            hidden=rng.choice([None, rng.randint(1, max_width)])))
    return cases


def build(case: DispatchCase, device: str, seed: int, dtype: torch.dtype = torch.float32
          ) -> tuple[StackedExperts, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Experts, x, expert_index, expert_weight and an upstream gradient for `case` (in `dtype`, on `device`)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if case.kind == "mlp":
        experts = cmoe.MLPExperts(case.num_experts, case.in_features, case.out_features,
                                  hidden_features=case.hidden, bias=case.bias, activation=case.activation)
    else:
        experts = cmoe.LinearExperts(case.num_experts, case.in_features, case.out_features, bias=case.bias,
                                     activation=case.activation)
    x = torch.randn(case.tokens, case.in_features, generator=gen)
    scores = torch.randn(case.tokens, case.num_experts, generator=gen)
    if case.routing == "one_expert":
        scores[:, 0] += 100.0
    elif case.routing == "skewed":
        scores[:, case.num_experts // 2:] -= 100.0
    top, index = scores.topk(case.top_k, dim=-1)
    weight = top.softmax(-1)
    if case.routing == "duplicates":
        index = torch.randint(case.num_experts, (case.tokens, case.top_k), generator=gen)
        weight = torch.rand(case.tokens, case.top_k, generator=gen) + 0.1
    grad = torch.randn(case.tokens, case.out_features, generator=gen)
    return (experts.to(device, dtype), x.to(device, dtype), index.to(device), weight.to(device, dtype),
            grad.to(device, dtype))


def run(experts: StackedExperts, x: torch.Tensor, index: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor,
        backend: str, dtype: torch.dtype) -> list[torch.Tensor]:
    """Output and every gradient (x, routing weights, each expert parameter) of one backend in `dtype`."""
    import copy

    experts = copy.deepcopy(experts).to(dtype)
    x = x.detach().to(dtype).clone().requires_grad_()
    weight = weight.detach().to(dtype).clone().requires_grad_()
    if backend == "triton_kernels":  # the kernels themselves, also for k = E (no dense fast path)
        from cmoe.kernels import triton_moe_project

        out = triton_moe_project(x, experts, index, weight, dense_fast_path=False)
    else:
        out = cmoe.moe_project(x, experts, index, weight, backend=backend)
    out.backward(grad.to(dtype))
    return [out, x.grad, weight.grad,
            *[torch.zeros_like(p) if p.grad is None else p.grad for p in experts.parameters()]]


def max_relative_error(got: list[torch.Tensor], ref: list[torch.Tensor]) -> tuple[float, int]:
    """The worst ``‖got − ref‖ / (‖ref‖ + tiny)`` over the tensors (float64), and which tensor it was."""
    errors = []
    for a, b in zip(got, ref, strict=True):
        assert a.shape == b.shape
        a, b = a.detach().double(), b.detach().double()
        errors.append(float((a - b).norm() / (b.norm() + 1e-12)))
    worst = max(range(len(errors)), key=errors.__getitem__)
    return errors[worst], worst


def assert_compiled_step_matches_eager(connector: torch.nn.Module, x: torch.Tensor,
                                       task_ids: torch.Tensor | None = None) -> None:
    """One connector step (forward, aux loss, backward) under ``torch.compile(fullgraph=True)`` with AOT autograd
    (no inductor code generation, so no compiler is needed) gives eager's output and parameter gradients."""

    def step(module: torch.nn.Module) -> list[torch.Tensor]:
        connector.zero_grad(set_to_none=True)
        out = module(x, task_ids=task_ids)
        (out.hidden_states.square().mean() + out.aux_loss).backward()
        return [out.hidden_states.detach(), *[p.grad.clone() for p in connector.parameters()]]

    eager = step(connector)
    compiled = step(torch.compile(connector, backend="aot_eager", fullgraph=True))
    for got, ref in zip(compiled, eager, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
