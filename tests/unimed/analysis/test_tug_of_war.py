"""Tug-of-war analysis: indexes on hand-made gradients, parameter groups of a real connector, routing per task,
the JSON report and its plots."""

from __future__ import annotations

import json
import math

import pytest
import torch

from cmoe import CMoEConfig, CMoEConnector, CMoEError, MLPConnector, MLPConnectorConfig, mean_weight_per_task
from cmoe.reference_models.unimed.analysis.gradients import (
    connector_parameter_groups,
    flat_group_gradients,
    per_task_group_gradients,
)
from cmoe.reference_models.unimed.analysis.measures import (
    Histogram,
    analyze_gradients,
    cosine_matrix,
    direction_index,
    distribution_entropy,
    magnitude_index,
    magnitude_index_from_norms,
    parameter_stats,
    routing_by_task,
    snapshot_parameters,
    zero_norm_tasks,
)
from cmoe.reference_models.unimed.analysis.plots import write_report
from cmoe.reference_models.unimed.analysis.report import TugOfWarReport


def two_tasks(a: list[float], b: list[float]) -> dict[str, torch.Tensor]:
    return {"vqa": torch.tensor(a), "grounding": torch.tensor(b)}


@pytest.mark.parametrize(("b", "cos", "conflict", "fraction"), [
    ([1.0, 2.0, 3.0], 1.0, 0.0, 0.0),      # identical
    ([2.0, 4.0, 6.0], 1.0, 0.0, 0.0),      # same direction, other length
    ([-1.0, -2.0, -3.0], -1.0, 1.0, 1.0),  # opposite
    ([3.0, 0.0, -1.0], 0.0, 0.0, 0.0),     # orthogonal
])
def test_two_task_cosine_and_direction_index(b: list[float], cos: float, conflict: float, fraction: float) -> None:
    tasks, matrix = cosine_matrix(two_tasks([1.0, 2.0, 3.0], b))
    assert tasks == ["vqa", "grounding"]
    assert matrix.shape == (2, 2)
    torch.testing.assert_close(matrix, torch.tensor([[1.0, cos], [cos, 1.0]], dtype=torch.float64))
    index = direction_index(matrix)
    assert index.conflict == pytest.approx(conflict)
    assert index.conflict_fraction == pytest.approx(fraction)
    assert index.mean_cosine == pytest.approx(cos, abs=1e-12)
    assert index.num_pairs == 1


def test_direction_index_averages_over_pairs() -> None:
    # pairs: (0,1) cos −0.5, (0,2) cos 0.5, (1,2) cos −1 → conflict (0.5 + 0 + 1) / 3, 2 of 3 pairs conflict
    cos = torch.tensor([[1.0, -0.5, 0.5], [-0.5, 1.0, -1.0], [0.5, -1.0, 1.0]])
    index = direction_index(cos)
    assert index.conflict == pytest.approx(0.5)
    assert index.conflict_fraction == pytest.approx(2 / 3)
    assert index.mean_cosine == pytest.approx(-1 / 3)
    assert index.min_cosine == pytest.approx(-1.0)
    assert index.num_pairs == 3
    assert math.isnan(direction_index(torch.ones(1, 1)).conflict)


def test_magnitude_index_norms_1_and_4() -> None:
    index = magnitude_index(two_tasks([1.0, 0.0], [0.0, 4.0]))
    assert index.max_min_ratio == pytest.approx(4.0)
    assert index.cv == pytest.approx(0.6)           # population std 1.5 / mean 2.5
    assert (index.mean_norm, index.std_norm) == pytest.approx((2.5, 1.5))
    assert magnitude_index_from_norms([3.0, 3.0, 3.0]).cv == 0.0


def test_zero_gradient_is_flagged_not_nan() -> None:
    grads = two_tasks([0.0, 0.0, 0.0], [1.0, 2.0, 3.0])
    tasks, cos = cosine_matrix(grads)
    assert torch.isfinite(cos).all()
    torch.testing.assert_close(cos, torch.tensor([[0.0, 0.0], [0.0, 1.0]], dtype=torch.float64))
    assert zero_norm_tasks(grads) == ["vqa"]
    assert direction_index(cos).conflict == 0.0
    magnitude = magnitude_index(grads)
    assert magnitude.max_min_ratio == math.inf and magnitude.cv == pytest.approx(1.0)
    analysis = analyze_gradients(grads)
    assert analysis.zero_norm_tasks == ["vqa"] and analysis.norms["vqa"] == 0.0
    both_zero = magnitude_index(two_tasks([0.0], [0.0]))
    assert math.isnan(both_zero.cv) and math.isnan(both_zero.max_min_ratio)


def test_gradients_of_different_sizes_are_rejected() -> None:
    with pytest.raises(CMoEError, match="task_grads: expected gradients of one size"):
        cosine_matrix(two_tasks([1.0, 2.0], [1.0]))


def tiny_connector() -> CMoEConnector:
    return CMoEConnector(CMoEConfig(in_features=8, out_features=6, num_experts=3, router="soft", expert="mlp"))


def test_parameter_groups_slice_the_stacked_expert_gradients() -> None:
    connector = tiny_connector()
    connector(torch.randn(2, 4, 8)).hidden_states.square().sum().backward()
    groups = connector_parameter_groups(connector)
    assert list(groups) == ["expert_0", "expert_1", "expert_2", "router", "all"]
    assert all(m.index == 1 for m in groups["expert_1"])
    assert {m.name for m in groups["router"]} == {n for n, _ in connector.router.named_parameters(prefix="router")}
    flat = flat_group_gradients(connector, groups)
    for e in range(3):
        expected = torch.cat([p.grad[e].reshape(-1) for p in connector.experts.parameters()])
        assert torch.equal(flat[f"expert_{e}"], expected)
        assert flat[f"expert_{e}"].dtype == torch.float32
    router = torch.cat([p.grad.reshape(-1) for p in connector.router.parameters()])
    assert torch.equal(flat["router"], router)
    total = sum(p.numel() for p in connector.parameters())
    assert flat["all"].numel() == total
    assert sum(flat[k].numel() for k in ("expert_0", "expert_1", "expert_2", "router")) == total

    connector.zero_grad(set_to_none=True)
    zeros = flat_group_gradients(connector, groups)
    assert all(v.numel() > 0 and not v.any() for v in zeros.values())


def test_per_task_gradients_match_separate_backwards() -> None:
    connector = tiny_connector()
    x = torch.randn(2, 4, 8)
    out = connector(x).hidden_states
    losses = {"vqa": out[0].square().mean(), "grounding": out[1].abs().mean()}
    by_autograd = per_task_group_gradients(connector, losses)
    assert all(p.grad is None for p in connector.parameters())
    for task, loss in losses.items():
        connector.zero_grad(set_to_none=True)
        loss.backward(retain_graph=True)
        for group, vector in flat_group_gradients(connector).items():
            torch.testing.assert_close(by_autograd[task][group], vector)


def test_mlp_connector_groups() -> None:
    connector = MLPConnector(MLPConnectorConfig(in_features=8, out_features=6))
    groups = connector_parameter_groups(connector)
    assert list(groups) == ["projector", "all"]
    assert [m.name for m in groups["projector"]] == [n for n, _ in connector.named_parameters()]
    assert list(parameter_stats(connector)) == ["projector"]


def test_parameter_stats_and_updates() -> None:
    connector = tiny_connector()
    before = snapshot_parameters(connector)
    stats = parameter_stats(connector, bins=10)
    assert list(stats) == ["expert_0", "expert_1", "expert_2", "router"]
    w0 = torch.cat([p[0].detach().reshape(-1) for p in connector.experts.parameters()]).double()
    s0 = stats["expert_0"]
    assert s0.numel == w0.numel() and s0.update_norm is None and s0.update_histogram is None
    assert s0.norm == pytest.approx(float(w0.norm()))
    assert s0.mean == pytest.approx(float(w0.mean()))
    assert s0.std == pytest.approx(float(w0.std(correction=0)))
    assert sum(s0.histogram.counts) == w0.numel() and len(s0.histogram.edges) == 11

    with torch.no_grad():
        for p in connector.experts.parameters():
            p[2].add_(0.5)
    after = parameter_stats(connector, before, bins=10)
    assert after["expert_0"].update_norm == 0.0
    moved = after["expert_2"]
    n = moved.numel
    assert moved.update_norm == pytest.approx(0.5 * math.sqrt(n))
    base = torch.cat([before[name][2].reshape(-1) for name, _ in connector.experts.named_parameters(prefix="experts")])
    assert moved.relative_update == pytest.approx(0.5 * math.sqrt(n) / float(base.double().norm()))
    with pytest.raises(CMoEError, match="previous_state: expected an entry for every connector parameter"):
        parameter_stats(connector, {})


def test_routing_by_task_means_and_entropies() -> None:
    # 3 samples × 2 tokens, 4 experts: sample 0 (task 0) uniform, sample 1 (task 1) one-hot on expert 2,
    # sample 2 (task 0) one-hot on expert 0 for both tokens
    uniform = [0.25] * 4
    probs = torch.tensor([[uniform, uniform], [[0, 0, 1.0, 0], [0, 0, 1.0, 0]], [[1.0, 0, 0, 0], [1.0, 0, 0, 0]]])
    routing = routing_by_task(probs, torch.tensor([0, 1, 0]), task_names=["vqa", "grounding"])
    assert list(routing) == ["vqa", "grounding"]
    assert routing["vqa"].mean_weight == pytest.approx([0.625, 0.125, 0.125, 0.125])
    assert routing["vqa"].num_tokens == 4
    assert routing["grounding"].mean_weight == pytest.approx([0.0, 0.0, 1.0, 0.0])
    assert routing["grounding"].entropy == 0.0 and routing["grounding"].normalized_entropy == 0.0

    only_uniform = routing_by_task(probs[:1].reshape(2, 4), torch.tensor([5, 5]))
    assert list(only_uniform) == ["5"]
    assert only_uniform["5"].entropy == pytest.approx(math.log(4))
    assert only_uniform["5"].normalized_entropy == pytest.approx(1.0)
    assert distribution_entropy([0.5, 0.5, 0.0, 0.0]) == pytest.approx((math.log(2), 0.5))

    per_token = routing_by_task(probs.reshape(6, 4), ["a", "a", "b", "b", "a", "a"])
    assert per_token["a"].mean_weight == routing["vqa"].mean_weight


def test_routing_by_task_agrees_with_mean_weight_per_task() -> None:
    connector = CMoEConnector(CMoEConfig(in_features=8, out_features=6, num_experts=3, top_k=2))
    task_ids = torch.tensor([1, 0, 1])
    result = connector(torch.randn(3, 4, 8)).routing
    ours = routing_by_task(result, task_ids)
    reference = mean_weight_per_task(result, task_ids, num_tasks=2)
    for t in (0, 1):
        assert ours[str(t)].mean_weight == pytest.approx(reference[t].tolist())


def make_report() -> TugOfWarReport:
    connector = tiny_connector()
    before = snapshot_parameters(connector)
    report = TugOfWarReport(meta={"connector": "cmoe", "num_experts": 3})
    x, task_ids = torch.randn(3, 4, 8), torch.tensor([0, 1, 2])
    optimizer = torch.optim.SGD(connector.parameters(), lr=0.1)
    for step in (0, 10):
        out = connector(x, task_ids)
        losses = {"vqa": out.hidden_states[0].square().mean(), "caption": out.hidden_states[1].mean(),
                  "grounding": -out.hidden_states[2].mean()}
        grads = per_task_group_gradients(connector, losses)
        routing = routing_by_task(out.routing.router_probs, task_ids, ["vqa", "caption", "grounding"])
        report.record(step, grads, routing, parameter_stats(connector, before, bins=20))
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
    return report


def test_report_records_every_group() -> None:
    report = make_report()
    last = report.steps[-1]
    assert list(last.gradients) == ["expert_0", "expert_1", "expert_2", "router", "all"]
    assert last.gradients["all"].tasks == ["vqa", "caption", "grounding"]
    assert last.parameters["expert_0"].update_norm > 0
    steps, values = report.index_curves("magnitude")["router"]
    assert steps == [0, 10] and len(values) == 2

@pytest.mark.smoke

def test_write_report_plots_and_json_round_trip(tmp_path) -> None:
    report = make_report()
    paths = write_report(report, tmp_path)
    names = sorted(p.name for p in paths)
    assert names == sorted(["tug_of_war.json", "index_curves.png", "routing.png", "parameter_histograms.png",
                            *(f"cosine_{g}.png" for g in ("expert_0", "expert_1", "expert_2", "router", "all"))])
    for path in paths:
        assert path.is_file() and path.stat().st_size > 1000
        if path.suffix == ".png":
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((tmp_path / "tug_of_war.json").read_text())
    assert data == report.to_dict()
    assert TugOfWarReport.from_dict(data).to_dict() == data
    loaded = TugOfWarReport.load_json(tmp_path / "tug_of_war.json").steps[0].gradients["all"]
    torch.testing.assert_close(torch.tensor(loaded.cosine), torch.tensor(report.steps[0].gradients["all"].cosine))
    assert not list(tmp_path.glob(".*.tmp"))


def test_undefined_values_become_null_and_come_back(tmp_path) -> None:
    report = TugOfWarReport()
    report.record(3, {"vqa": {"all": torch.zeros(4)}, "caption": {"all": torch.ones(4)}})
    data = report.to_dict()
    assert data["steps"][0]["gradients"]["all"]["magnitude"]["max_min_ratio"] is None  # 1 / 0
    json.dumps(data, allow_nan=False)
    paths = write_report(report, tmp_path)
    assert {p.name for p in paths} == {"tug_of_war.json", "index_curves.png", "cosine_all.png"}
    assert TugOfWarReport.load_json(paths[0]).to_dict() == data
    with pytest.raises(CMoEError, match="step: expected one of the recorded steps"):
        write_report(report, tmp_path, step=99)


def test_histogram_of_a_near_constant_update() -> None:
    half = torch.tensor([0.5], dtype=torch.float64)
    values = torch.cat([half, torch.nextafter(half, torch.ones(1, dtype=torch.float64))])
    hist = Histogram.of(values, bins=50)
    assert sum(hist.counts) == 2 and len(hist.edges) == 51
    assert hist.edges[0] < 0.5 < hist.edges[-1]
