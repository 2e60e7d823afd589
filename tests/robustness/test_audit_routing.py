"""Audit: bad tensors given to routers and connectors, and numerics at the edges. Each must raise a
`CMoEError` naming the argument and what was expected, or give the correct (finite, normalised) result."""

from __future__ import annotations

import warnings

import pytest
import torch
from robustness_audit import assert_clear

from cmoe import CMoEConfig, CMoEConnector, CMoEError, MLPConnector, MLPConnectorConfig

SIGMOID_ROUTERS = ["soft", "task", "task_token"]
OFFSETS = [-104.0, -105.0, -200.0, -1e4, -3e38, 60.0, 1e4]


def _connector(router: str, **kwargs) -> CMoEConnector:
    return CMoEConnector(CMoEConfig(in_features=8, out_features=6, num_experts=4, router=router, num_tasks=3,
                                    **kwargs))


@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("router", SIGMOID_ROUTERS)
def test_sigmoid_rule_is_finite_and_exact_at_extreme_logits(router: str, offset: float) -> None:
    connector = _connector(router)
    gate = connector.router.gate
    with torch.no_grad():
        gate.weight.zero_()
        gate.bias.copy_(torch.tensor([offset, offset - 1.0, offset - 2.0, offset - 3.0]))
    out = connector(torch.randn(2, 3, 8), task_ids=torch.tensor([0, 2]))
    probs = out.routing.router_probs
    logits = out.routing.router_logits.double()
    # The reference in float64 through log-sigmoid: sigmoid(l) / sum sigmoid(l), exact where fp32 underflows.
    expected = torch.softmax(torch.nn.functional.logsigmoid(logits), dim=-1).float()
    assert torch.isfinite(probs).all() and torch.isfinite(out.hidden_states).all()
    torch.testing.assert_close(probs, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(probs.sum(-1), torch.ones(6))


TASK_ROUTERS = ["task", "task_token", "hard_task"]
BAD_TASK_IDS = {
    "bool": lambda: torch.tensor([True, False]),
    "float": lambda: torch.tensor([0.0, 1.0]),
    "too many": lambda: torch.tensor([0, 1, 2]),
    "2-d": lambda: torch.tensor([[0], [1]]),
    "out of range": lambda: torch.tensor([0, 3]),
    "negative": lambda: torch.tensor([-1, 0]),
    "meta device": lambda: torch.tensor([0, 1], device="meta"),
    "missing": lambda: None,
    "complex": lambda: torch.tensor([0, 1], dtype=torch.complex64),
}


@pytest.mark.parametrize("kind", list(BAD_TASK_IDS))
@pytest.mark.parametrize("router", TASK_ROUTERS)
def test_bad_task_ids_are_refused(router: str, kind: str) -> None:
    connector = _connector(router)
    with pytest.raises(CMoEError) as error:
        connector(torch.randn(2, 3, 8), task_ids=BAD_TASK_IDS[kind]())
    assert_clear(error.value, "task_ids")


@pytest.mark.parametrize("router", TASK_ROUTERS)
def test_task_ids_as_a_list_or_int32_route_like_a_long_tensor(router: str) -> None:
    connector = _connector(router)
    x = torch.randn(2, 3, 8)
    reference = connector(x, task_ids=torch.tensor([1, 2])).hidden_states
    assert torch.equal(connector(x, task_ids=[1, 2]).hidden_states, reference)
    assert torch.equal(connector(x, task_ids=torch.tensor([1, 2], dtype=torch.int32)).hidden_states, reference)


BAD_X = {
    "meta": lambda: torch.randn(2, 4, 8, device="meta"),
    "empty batch": lambda: torch.randn(0, 4, 8),
    "zero tokens": lambda: torch.randn(2, 0, 8),
    "int": lambda: torch.ones(2, 4, 8, dtype=torch.long),
    "bool": lambda: torch.ones(2, 4, 8, dtype=torch.bool),
    "wrong width": lambda: torch.randn(2, 4, 7),
    "2-d": lambda: torch.randn(8, 8),
    "4-d": lambda: torch.randn(1, 2, 4, 8),
    "float64": lambda: torch.randn(2, 4, 8, dtype=torch.float64),
    "bfloat16": lambda: torch.randn(2, 4, 8, dtype=torch.bfloat16),
    "list": lambda: [[0.0] * 8] * 4,
    "tokens not divisible by aggregate": lambda: torch.randn(2, 3, 8),
}
CONNECTORS = {
    "token_topk": lambda: _connector("token_topk", aggregate_tokens=2, top_k=2),
    "task_token": lambda: _connector("task_token", aggregate_tokens=2),
    "constant": lambda: _connector("constant", aggregate_tokens=2),
    "mlp": lambda: MLPConnector(MLPConnectorConfig(in_features=8, out_features=6, aggregate_tokens=2)),
}


@pytest.mark.parametrize("kind", list(BAD_X))
@pytest.mark.parametrize("connector", list(CONNECTORS))
def test_bad_visual_tokens_are_refused(connector: str, kind: str) -> None:
    model = CONNECTORS[connector]()
    with pytest.raises(CMoEError) as error:
        model(BAD_X[kind](), task_ids=torch.tensor([0, 1]))
    assert_clear(error.value, "x")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("router", ["token_topk", "soft", "task_token"])
def test_non_finite_features_are_reported_not_routed(router: str, value: float) -> None:
    x = torch.randn(2, 4, 8)
    x[1, 2, 3] = value
    with pytest.raises(CMoEError) as error:
        _connector(router)(x, task_ids=torch.tensor([0, 1]))
    assert_clear(error.value, "router_logits")


def test_mismatched_dtype_is_allowed_under_autocast() -> None:
    connector = _connector("task_token")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = connector(torch.randn(2, 4, 8, dtype=torch.bfloat16), task_ids=torch.tensor([0, 1]))
    assert torch.isfinite(out.hidden_states.float()).all()


@pytest.mark.parametrize("router", ["token_topk", "soft", "task_token"])
def test_fp16_inputs_near_the_fp16_range_warn(router: str) -> None:
    connector = _connector(router).half()
    with pytest.warns(RuntimeWarning, match="fp16"):
        connector((torch.randn(2, 4, 8) * 1e4).half(), task_ids=torch.tensor([0, 1]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        connector(torch.randn(2, 4, 8).half(), task_ids=torch.tensor([0, 1]))
