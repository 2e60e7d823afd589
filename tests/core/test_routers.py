"""Routers: distributions, top-k, task behaviour, aux losses by hand, options and errors."""

from __future__ import annotations

import math

import pytest
import torch

from cmoe import CMoEError, ROUTERS, UnknownNameError, get_router, load_balancing_loss, router_z_loss

LEARNED = ["token_topk", "soft", "task", "task_token"]


def build(name: str, **options):
    options.setdefault("num_tasks", 3)
    return get_router(name)(8, 4, **options)


def test_builtin_names() -> None:
    builtin = {n for n in ROUTERS.names() if ROUTERS.origin(n) == "cmoe (built-in)"}
    assert builtin == {"token_topk", "soft", "task", "task_token", "hard_task", "constant"}


def test_unknown_router_lists_known_names() -> None:
    with pytest.raises(UnknownNameError, match="unknown router 'switch'; known routers: constant, hard_task, .*soft, task, task_token, token_topk"):
        get_router("switch")


@pytest.mark.parametrize("name,gate", [*[(n, g) for n in LEARNED for g in ("linear", "mlp")],
                                       ("hard_task", "linear"), ("constant", "linear")])
def test_result_shapes_and_probabilities(name: str, gate: str) -> None:
    router = build(name, gate=gate)
    x = torch.randn(2, 5, 8)
    r = router(x, torch.tensor([0, 2]))
    k = router.top_k
    assert r.expert_index.shape == (10, k) and r.expert_index.dtype == torch.long
    assert r.expert_weight.shape == (10, k)
    assert r.router_probs.shape == r.router_logits.shape == (10, 4)
    torch.testing.assert_close(r.router_probs.sum(-1), torch.ones(10))
    assert torch.isfinite(r.router_logits).all()
    assert (r.expert_index >= 0).all() and (r.expert_index < 4).all()


def test_token_topk_picks_the_k_largest_and_renormalises() -> None:
    router = build("token_topk", top_k=2)
    r = router(torch.randn(3, 7, 8))
    expected = torch.softmax(r.router_logits, -1)
    torch.testing.assert_close(r.router_probs, expected)
    top = expected.topk(2, dim=-1)
    assert torch.equal(r.expert_index, top.indices)
    torch.testing.assert_close(r.expert_weight, top.values / top.values.sum(-1, keepdim=True))
    assert router.top_k == 2 and build("token_topk").top_k == 2


def test_without_renormalise_weights_are_the_probabilities() -> None:
    r = build("token_topk", top_k=2, renormalize=False)(torch.randn(2, 3, 8))
    torch.testing.assert_close(r.expert_weight, r.router_probs.gather(1, r.expert_index))


def test_soft_rule_is_sigmoid_normalised_not_softmax() -> None:
    r = build("soft")(torch.randn(2, 3, 8))
    gates = torch.sigmoid(r.router_logits)
    torch.testing.assert_close(r.router_probs, gates / gates.sum(-1, keepdim=True))
    assert not torch.allclose(r.router_probs, torch.softmax(r.router_logits, -1))
    assert r.top_k == 4
    torch.testing.assert_close(r.expert_weight, r.router_probs)


@pytest.mark.parametrize("name", LEARNED)
def test_top_k_makes_any_learned_router_sparse(name: str) -> None:
    r = build(name, top_k=1)(torch.randn(2, 3, 8), torch.tensor([1, 2]))
    assert r.expert_index.shape == (6, 1)
    torch.testing.assert_close(r.expert_weight, r.router_probs.gather(1, r.expert_index))


def test_task_router_gives_all_tokens_of_a_sample_the_same_weights() -> None:
    router = build("task", top_k=2)
    x = torch.randn(3, 6, 8)
    r = router(x, torch.tensor([0, 1, 0]))
    probs = r.router_probs.view(3, 6, 4)
    assert torch.equal(probs, probs[:, :1].expand_as(probs))
    assert torch.equal(probs[0], probs[2])            # same task → same weights
    assert not torch.allclose(probs[0], probs[1])     # different task → different weights
    assert torch.equal(router(torch.randn(3, 6, 8), torch.tensor([0, 1, 0])).router_probs, r.router_probs)


def test_task_token_router_depends_on_both_task_and_token() -> None:
    router = build("task_token")
    x = torch.randn(1, 4, 8)
    a, b = router(x, torch.tensor([0])).router_probs, router(x, torch.tensor([1])).router_probs
    assert not torch.allclose(a, b)
    assert not torch.allclose(a[0], a[1])
    assert router.gate.in_features == 16  # [task embedding (width of the token) ; token]


def test_mlp_gate_has_hidden_four_times_its_input_by_default() -> None:
    router = build("task_token", gate="mlp")
    assert router.gate[0].in_features == 16 and router.gate[0].out_features == 64
    assert build("soft", gate="mlp", gate_hidden=5).gate[0].out_features == 5


def test_hard_task_router_sends_each_task_to_its_expert() -> None:
    router = get_router("hard_task")(8, 3, num_tasks=5)
    r = router(torch.randn(5, 2, 8), torch.arange(5))
    assert torch.equal(r.expert_index.view(5, 2), torch.tensor([0, 1, 2, 0, 1])[:, None].expand(5, 2))
    assert torch.equal(r.expert_weight, torch.ones(10, 1))
    assert list(router.parameters()) == []


def test_constant_router_is_uniform() -> None:
    r = get_router("constant")(8, 4)(torch.randn(2, 3, 8))
    torch.testing.assert_close(r.expert_weight, torch.full((6, 4), 0.25))
    torch.testing.assert_close(torch.softmax(r.router_logits, -1), r.router_probs)


def test_load_balancing_loss_by_hand() -> None:
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.5, 0.25, 0.25], [0.2, 0.2, 0.6]])
    index = torch.tensor([[0], [1], [0], [2]])
    # f = (2/4, 1/4, 1/4); P = (1.5/4, 1.25/4, 1.25/4); E·Σ f·P = 3·(0.1875 + 0.078125 + 0.078125)
    assert load_balancing_loss(probs, index).item() == pytest.approx(3 * (0.1875 + 0.078125 + 0.078125))
    uniform = torch.full((4, 3), 1 / 3)
    assert load_balancing_loss(uniform, torch.tensor([[0], [1], [2], [0]])).item() == pytest.approx(1.0)


def test_z_loss_by_hand() -> None:
    logits = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    expected = (math.log(2) ** 2 + math.log(math.e + math.e ** 2) ** 2) / 2
    assert router_z_loss(logits).item() == pytest.approx(expected, rel=1e-6)


def test_aux_losses_are_weighted_by_their_coefficients_and_off_by_default() -> None:
    x = torch.randn(2, 5, 8)
    assert build("token_topk")(x).aux_losses == {}
    router = build("token_topk", load_balance_coef=0.5, z_loss_coef=0.01)
    r = router(x)
    assert r.aux_losses["load_balance"].item() == pytest.approx(
        0.5 * load_balancing_loss(r.router_probs, r.expert_index).item())
    assert r.aux_losses["z_loss"].item() == pytest.approx(0.01 * router_z_loss(r.router_logits).item())
    sum(r.aux_losses.values()).backward()
    assert router.gate.weight.grad is not None and router.gate.weight.grad.abs().sum() > 0


def test_top1_router_still_receives_gradient() -> None:
    """k = 1 keeps the weight at the probability: renormalising would make it 1 and freeze the router."""
    router = build("token_topk", top_k=1)
    r = router(torch.randn(2, 5, 8))
    (r.expert_weight * torch.randn(10, 1)).sum().backward()
    assert router.gate.weight.grad.abs().sum() > 0


def test_noise_only_in_training() -> None:
    router = build("token_topk", noise_std=1.0)
    x = torch.randn(2, 5, 8)
    router.eval()
    assert torch.equal(router(x).router_logits, router(x).router_logits)
    router.train()
    assert not torch.equal(router(x).router_logits, router(x).router_logits)


@pytest.mark.parametrize("name", ["task", "task_token", "hard_task"])
def test_task_ids_required_and_checked(name: str) -> None:
    router = build(name)
    x = torch.randn(2, 3, 8)
    with pytest.raises(CMoEError, match=rf"task_ids: router '{name}' needs one task id per sample, shape \[2\]"):
        router(x)
    with pytest.raises(CMoEError, match=r"task_ids: expected values in 0..2 \(num_tasks=3\), got values in 0..3"):
        router(x, torch.tensor([0, 3]))
    with pytest.raises(CMoEError, match=r"task_ids: expected an integer tensor of shape \[2\]"):
        router(x, torch.tensor([0, 1, 2]))


@pytest.mark.parametrize("kwargs,match", [
    (dict(top_k=5), r"top_k: expected an int in 1..num_experts=4"),
    (dict(top_k=0), r"top_k: expected an int in 1..num_experts=4"),
    (dict(gate="conv"), r"router_gate: expected one of \('linear', 'mlp'\), got 'conv'"),
    (dict(rule="relu"), r"router_rule: expected one of \('softmax', 'sigmoid'\)"),
    (dict(input="image"), r"router_input: expected one of"),
])
def test_bad_options_raise(kwargs: dict, match: str) -> None:
    with pytest.raises(CMoEError, match=match):
        build("token_topk", **kwargs)


def test_task_input_needs_num_tasks() -> None:
    with pytest.raises(CMoEError, match="num_tasks: expected an int >= 1 for router input 'task'"):
        get_router("task")(8, 4)


def test_wrong_width_and_non_finite_logits_raise() -> None:
    router = build("token_topk")
    with pytest.raises(CMoEError, match=r"x: expected a \[batch, tokens, 8\] tensor, got shape \[2, 3, 9\]"):
        router(torch.randn(2, 3, 9))
    x = torch.randn(2, 3, 8)
    x[0, 0, 0] = float("nan")
    with pytest.raises(CMoEError, match="router_logits: expected finite values"):
        router(x)


def test_fixed_router_option_errors() -> None:
    with pytest.raises(CMoEError, match="top_k: expected None or 1 for router 'hard_task'"):
        get_router("hard_task")(8, 4, num_tasks=2, top_k=2)
    with pytest.raises(CMoEError, match="top_k: expected None or num_experts=4 for router 'constant'"):
        get_router("constant")(8, 4, top_k=2)
    with pytest.raises(CMoEError, match="router_gate: expected the default for router 'constant'"):
        get_router("constant")(8, 4, gate="mlp")
