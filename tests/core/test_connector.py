"""CMoEConnector and MLPConnector: shapes, aggregation, configs, save/load, atomic writes, errors."""

from __future__ import annotations

import json
import os

import pytest
import torch

import cmoe.io
from cmoe import (
    CMoEConfig,
    CMoEConnector,
    CMoEError,
    MLPConnector,
    MLPConnectorConfig,
    UnknownNameError,
    aggregate_tokens,
    build_connector,
    load_connector,
)
from dispatch_cases import assert_compiled_step_matches_eager

pytestmark = pytest.mark.smoke  # in the newest-versions stage (.ci/latest)


def test_aggregation_concatenates_consecutive_tokens() -> None:
    x = torch.arange(2 * 8 * 3, dtype=torch.float32).view(2, 8, 3)
    y = aggregate_tokens(x, 4)
    assert y.shape == (2, 2, 12)
    assert torch.equal(y[1, 1], torch.cat([x[1, 4], x[1, 5], x[1, 6], x[1, 7]]))
    assert aggregate_tokens(x, 1) is x


def test_aggregation_rejects_indivisible_token_counts() -> None:
    with pytest.raises(CMoEError, match="x: expected a token count divisible by aggregate_tokens=4.*got 10 tokens"):
        aggregate_tokens(torch.randn(1, 10, 3), 4)


@pytest.mark.parametrize("router", ["token_topk", "soft", "task", "task_token", "hard_task", "constant"])
@pytest.mark.parametrize("expert", ["linear", "mlp"])
def test_connector_shapes_and_training_step(router: str, expert: str) -> None:
    config = CMoEConfig(in_features=6, out_features=10, num_experts=3, router=router, expert=expert,
                        aggregate_tokens=4, num_tasks=2, load_balance_coef=0.01, z_loss_coef=0.001)
    model = CMoEConnector(config)
    out = model(torch.randn(2, 8, 6), torch.tensor([0, 1]))
    assert out.hidden_states.shape == (2, 2, 10)
    assert out.aux_loss.dim() == 0
    assert out.routing.router_probs.shape == (4, 3)
    (out.hidden_states.square().mean() + out.aux_loss).backward()
    assert model.experts.weights[0].grad is not None


def test_router_and_experts_see_aggregated_width() -> None:
    model = CMoEConnector(CMoEConfig(in_features=6, out_features=10, aggregate_tokens=4))
    assert model.router.in_features == 24 and model.experts.in_features == 24
    assert model.experts.weights[0].shape == (4, 10, 24)  # [E, out, in], hidden defaults to out


def test_connector_matches_manual_composition() -> None:
    model = CMoEConnector(CMoEConfig(in_features=5, out_features=7, num_experts=4, top_k=2, aggregate_tokens=2))
    x = torch.randn(3, 6, 5)
    out = model(x)
    tokens = aggregate_tokens(x, 2)
    r = model.router(tokens)
    expected = cmoe.moe_project(tokens.reshape(9, 10), model.experts, r.expert_index, r.expert_weight,
                                backend="loop").view(3, 3, 7)
    torch.testing.assert_close(out.hidden_states, expected)


def test_every_backend_gives_the_same_connector_output() -> None:
    torch.manual_seed(0)
    base = CMoEConnector(CMoEConfig(in_features=5, out_features=7, num_experts=4, top_k=2, backend="loop"))
    x = torch.randn(2, 3, 5)
    ref = base(x).hidden_states
    for backend in ("sorted", "dense", "auto"):
        base.config.backend = backend
        torch.testing.assert_close(base(x).hidden_states, ref)


@pytest.mark.parametrize("router, options", [("soft", {}), ("task_token", {"num_tasks": 3, "router_rule": "sigmoid"})])
def test_dense_routing_compiles_in_one_graph(router: str, options: dict) -> None:
    """Dense routing (Uni-Med's soft router) needs no host sync, so ``torch.compile(fullgraph=True)`` takes the
    whole connector step, with eager's output and gradients."""
    connector = CMoEConnector(CMoEConfig(in_features=12, out_features=10, num_experts=4, router=router,
                                         backend="dense", check_finite=False, **options))
    assert_compiled_step_matches_eager(connector, torch.randn(2, 8, 12), torch.tensor([0, 2]) if options else None)


def test_default_connector_compiles_in_one_graph_and_eager_still_checks_logits() -> None:
    """The README's line as written: the defaults (``backend="auto"``, ``check_finite=True``) under
    ``fullgraph=True``. Tracing skips the finite check (a host sync) and takes ``dense`` for dense routing."""
    connector = CMoEConnector(CMoEConfig(in_features=12, out_features=10, num_experts=4, router="soft"))
    assert_compiled_step_matches_eager(connector, torch.randn(2, 8, 12), None)
    with pytest.raises(CMoEError, match="router_logits: expected finite values"):
        connector(torch.full((1, 2, 12), float("nan")))


def test_aux_loss_is_sum_of_router_terms() -> None:
    model = CMoEConnector(CMoEConfig(in_features=4, out_features=4, load_balance_coef=0.1, z_loss_coef=0.01))
    out = model(torch.randn(2, 3, 4))
    assert set(out.routing.aux_losses) == {"load_balance", "z_loss"}
    torch.testing.assert_close(out.aux_loss, sum(out.routing.aux_losses.values()))
    assert CMoEConnector(CMoEConfig(4, 4))(torch.randn(1, 2, 4)).aux_loss.item() == 0.0


def test_save_load_round_trip_is_bit_exact(tmp_path) -> None:
    config = CMoEConfig(in_features=6, out_features=10, num_experts=3, top_k=2, router="task_token",
                        router_gate="mlp", router_hidden=7, expert_hidden=5, aggregate_tokens=2, num_tasks=4)
    model = CMoEConnector(config)
    model.save_pretrained(tmp_path / "ckpt")
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["checksums.json", "config.json", "model.safetensors"]
    loaded = CMoEConnector.from_pretrained(tmp_path / "ckpt")
    assert loaded.config == config
    for (name, a), (name_b, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert name == name_b and torch.equal(a, b)
    x, tasks = torch.randn(2, 4, 6), torch.tensor([3, 0])
    assert torch.equal(model(x, tasks).hidden_states, loaded(x, tasks).hidden_states)
    assert isinstance(load_connector(tmp_path / "ckpt"), CMoEConnector)


def test_mlp_connector_round_trip_and_interface(tmp_path) -> None:
    model = MLPConnector(MLPConnectorConfig(in_features=6, out_features=10, hidden_features=12, aggregate_tokens=2))
    out = model(torch.randn(2, 4, 6), task_ids=torch.tensor([0, 1]))
    assert out.hidden_states.shape == (2, 2, 10) and out.routing is None and out.aux_loss.item() == 0.0
    model.save_pretrained(tmp_path)
    loaded = load_connector(tmp_path)
    assert isinstance(loaded, MLPConnector)
    x = torch.randn(1, 4, 6)
    assert torch.equal(model(x).hidden_states, loaded(x).hidden_states)
    assert json.loads((tmp_path / "config.json").read_text())["connector_type"] == "mlp"


def test_build_connector_dispatches_on_config_type() -> None:
    assert isinstance(build_connector(CMoEConfig(2, 3)), CMoEConnector)
    assert isinstance(build_connector(MLPConnectorConfig(2, 3)), MLPConnector)


def test_failed_save_leaves_previous_checkpoint_intact(tmp_path, monkeypatch) -> None:
    model = CMoEConnector(CMoEConfig(in_features=4, out_features=4))
    model.save_pretrained(tmp_path)
    before = (tmp_path / "model.safetensors").read_bytes()

    def broken_save(tensors, path, metadata=None):
        with open(path, "wb") as handle:
            handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(cmoe.io, "save_file", broken_save)
    with torch.no_grad():
        model.experts.weights[0].add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["checksums.json", "config.json", "model.safetensors"]  # no temp files


def test_from_pretrained_errors_name_the_missing_file(tmp_path) -> None:
    with pytest.raises(CMoEError, match="no config.json here"):
        CMoEConnector.from_pretrained(tmp_path)
    CMoEConfig(2, 3).save_pretrained(tmp_path)
    with pytest.raises(CMoEError, match="model.safetensors: missing"):
        CMoEConnector.from_pretrained(tmp_path)
    with pytest.raises(CMoEError, match="connector_type: expected 'mlp', got 'cmoe'"):
        MLPConnector.from_pretrained(tmp_path)


def test_config_from_dict_rejects_unknown_fields() -> None:
    with pytest.raises(CMoEError, match=r"unknown field\(s\) \['experts'\]; known fields: .*'num_experts'"):
        CMoEConfig.from_dict({"in_features": 2, "out_features": 3, "experts": 4})
    config = CMoEConfig(2, 3, router_options={"capacity": 2})
    assert CMoEConfig.from_dict(json.loads(config.to_json_string())) == config


@pytest.mark.parametrize("kwargs,match", [
    (dict(top_k=5), r"top_k: expected None or an int in 1..num_experts=4, got 5"),
    (dict(num_experts=0), r"num_experts: expected an int >= 1, got 0"),
    (dict(aggregate_tokens=0), r"aggregate_tokens: expected an int >= 1"),
    (dict(load_balance_coef=-1.0), r"load_balance_coef: expected a number >= 0"),
    (dict(in_features=2.5), r"in_features: expected an int >= 1, got 2.5"),
])
def test_config_validation(kwargs: dict, match: str) -> None:
    args = dict(in_features=4, out_features=4)
    args.update(kwargs)
    with pytest.raises(CMoEError, match=match):
        CMoEConfig(**args)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(router="switch"), UnknownNameError, "unknown router 'switch'; known routers: constant, hard_task"),
    (dict(expert="conv"), UnknownNameError, "unknown expert 'conv'; known experts: linear, mlp"),
    (dict(router="task"), CMoEError, "num_tasks: expected an int >= 1 for router input 'task'"),
    (dict(expert="linear", expert_hidden=8), CMoEError, "expert_hidden: expected None for 'linear' experts"),
])
def test_build_errors(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        CMoEConnector(CMoEConfig(in_features=4, out_features=4, **kwargs))


def test_forward_errors() -> None:
    model = CMoEConnector(CMoEConfig(in_features=4, out_features=4, router="task", num_tasks=2,
                                     aggregate_tokens=2))
    with pytest.raises(CMoEError, match=r"x: expected a \[batch, tokens, 4\] tensor \(in_features=4\), got shape \[2, 4\]"):
        model(torch.randn(2, 4))
    with pytest.raises(CMoEError, match="task_ids: router 'task' needs one task id per sample"):
        model(torch.randn(2, 4, 4))
    with pytest.raises(CMoEError, match="divisible by aggregate_tokens=2"):
        model(torch.randn(2, 3, 4), torch.tensor([0, 1]))
    with pytest.raises(UnknownNameError, match="unknown backend 'fast'; known backends: auto, dense, grouped_mm, loop"):
        CMoEConnector(CMoEConfig(in_features=4, out_features=4, backend="fast"))
