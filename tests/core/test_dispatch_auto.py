"""The measuring ``auto``: choices per shape class, caching in memory and on disk, the table mode, and that
the choice follows the measured times. A fake timer makes the choice deterministic (no timed assertions)."""

from __future__ import annotations

import json

import pytest
import torch

import cmoe
from cmoe import CMoEError, auto
from dispatch_cases import DispatchCase, build


class FakeTimer:
    """Returns preset milliseconds per backend and counts the timed calls (each call still runs)."""

    def __init__(self, ms: dict[str, float]):
        self.ms = ms
        self.calls: list[str] = []

    def __call__(self, name, call, device) -> float:
        call()
        self.calls.append(name)
        return self.ms[name]


def _inputs(tokens: int = 40, num_experts: int = 4, top_k: int = 2, dtype: torch.dtype = torch.float32):
    """Inference inputs (nothing needs a grad); a test sets ``requires_grad`` for the training class."""
    experts, x, index, weight, _ = build(DispatchCase(tokens, 16, 8, num_experts, top_k, "mlp"), "cpu", 0, dtype)
    return experts.requires_grad_(False), x, index, weight


@pytest.mark.parametrize("fastest", ["sorted", "grouped_mm", "dense"])
def test_auto_runs_the_backend_the_timer_says_is_fastest(fastest: str, fresh_selector: None) -> None:
    times = {"sorted": 5.0, "grouped_mm": 5.0, "dense": 5.0, fastest: 1.0}
    timer = auto.configure_auto(timer=FakeTimer(times)).timer
    experts, x, index, weight = _inputs()
    out = cmoe.moe_project(x, experts, index, weight)
    assert torch.equal(out, cmoe.moe_project(x, experts, index, weight, backend=fastest))
    (choice,) = auto.auto_choices().values()
    assert choice.backend == fastest and choice.times_ms == times and choice.source == "measured"
    assert set(timer.calls) == set(times) and "loop" not in timer.calls  # the reference is never a candidate
    assert f"{fastest} (fastest measured: {fastest} 1 ms" in choice.explain()


class SequenceTimer:
    """Returns each backend's listed milliseconds in turn (the last one repeats), counting calls per backend."""

    def __init__(self, ms: dict[str, list[float]]):
        self.ms = {name: list(values) for name, values in ms.items()}
        self.calls: dict[str, int] = {}

    def __call__(self, name, call, device) -> float:
        call()
        count = self.calls[name] = self.calls.get(name, 0) + 1
        values = self.ms[name]
        return values[min(count, len(values)) - 1]


def test_a_near_tie_is_timed_again_before_the_choice(fresh_selector: None) -> None:
    # After 3 rounds sorted leads grouped_mm by 5 %: within the 10 % tie margin, so both get 6 more rounds,
    # in which grouped_mm is clearly faster; dense, far behind, is not timed again.
    timer = auto.configure_auto(timer=SequenceTimer({"sorted": [1.0], "grouped_mm": [1.05] * 3 + [0.8],
                                                     "dense": [5.0]})).timer
    experts, x, index, weight = _inputs()
    cmoe.moe_project(x, experts, index, weight)
    (choice,) = auto.auto_choices().values()
    assert choice.backend == "grouped_mm" and choice.times_ms["grouped_mm"] == 0.8
    assert timer.calls == {"sorted": 3 + auto.TIE_ROUNDS, "grouped_mm": 3 + auto.TIE_ROUNDS, "dense": 3}
    assert auto.near_ties({"a": 1.0, "b": 1.1, "c": 1.2}, 0.10) == ["a", "b"]


@pytest.mark.parametrize("grouped_ms, expected", [(0.98, "sorted"), (0.96, "grouped_mm")],
                         ids=["within-3pct-keeps-the-rule", "beyond-3pct-takes-the-fastest"])
def test_the_table_rules_backend_is_kept_when_it_measures_within_the_keep_margin(
        grouped_ms: float, expected: str, fresh_selector: None, tmp_path) -> None:
    # The table rule on CPU says sorted. grouped_mm measures 2 % faster: no measurement separates them, so the
    # rule's choice stays (and says why, also when read back from the cache file); 4 % faster: grouped_mm.
    times = {"sorted": 1.0, "grouped_mm": grouped_ms, "dense": 5.0}
    auto.configure_auto(timer=FakeTimer(times), cache_path=tmp_path / "auto.json")
    experts, x, index, weight = _inputs()
    out = cmoe.moe_project(x, experts, index, weight)
    (choice,) = auto.auto_choices().values()
    assert choice.backend == expected and choice.kept_table is (expected == "sorted")
    assert torch.equal(out, cmoe.moe_project(x, experts, index, weight, backend=expected))
    assert ("table rule's backend" in choice.explain()) is (expected == "sorted")
    auto.configure_auto(timer=FakeTimer(times), cache_path=tmp_path / "auto.json")
    cmoe.moe_project(x, experts, index, weight)
    (again,) = auto.auto_choices().values()
    assert again.source == "disk" and again.backend == expected and again.kept_table is choice.kept_table


def test_no_extra_rounds_when_the_fastest_is_clear_or_tie_rounds_is_zero(fresh_selector: None) -> None:
    timer = auto.configure_auto(timer=SequenceTimer({"sorted": [1.0], "grouped_mm": [1.05], "dense": [5.0]}),
                                tie_rounds=0).timer
    experts, x, index, weight = _inputs()
    cmoe.moe_project(x, experts, index, weight)
    assert timer.calls == {"sorted": 3, "grouped_mm": 3, "dense": 3}
    assert auto.auto_choices()[next(iter(auto.auto_choices()))].backend == "sorted"


def test_choice_is_cached_per_shape_class(fresh_selector: None) -> None:
    timer = auto.configure_auto(timer=FakeTimer({"sorted": 1.0, "grouped_mm": 2.0, "dense": 3.0}), rounds=2).timer
    experts, x, index, weight = _inputs(tokens=40)
    cmoe.moe_project(x, experts, index, weight)
    assert len(timer.calls) == 3 * 2  # each candidate, two rounds
    cmoe.moe_project(x[:33], experts, index[:33], weight[:33])  # 33 and 40 tokens share the bucket T <= 64
    assert len(timer.calls) == 6 and len(auto.auto_choices()) == 1
    cmoe.moe_project(x[:32], experts, index[:32], weight[:32])  # T <= 32: a new class
    x.requires_grad_()
    cmoe.moe_project(x, experts, index, weight)  # training: a new class
    keys = sorted(auto.auto_choices())
    assert len(keys) == 3 and len(timer.calls) == 18
    assert [k.split("|")[-2:] for k in keys] == [["T<=32", "infer"], ["T<=64", "infer"], ["T<=64", "train"]]
    assert all("cpu:2threads" in k and "float32|E4|k2|w16x8x8|bias|gelu" in k for k in keys)


def test_table_mode_times_nothing(fresh_selector: None, monkeypatch: pytest.MonkeyPatch) -> None:
    timer = auto.configure_auto(timer=FakeTimer({"sorted": 9.0, "grouped_mm": 1.0, "dense": 9.0})).timer
    monkeypatch.setenv(auto.ENV_MODE, "table")
    experts, x, index, weight = _inputs()
    assert torch.equal(cmoe.moe_project(x, experts, index, weight),
                       cmoe.moe_project(x, experts, index, weight, backend="sorted"))
    assert timer.calls == [] and auto.auto_choices() == {}
    monkeypatch.setenv(auto.ENV_MODE, "fastest")
    with pytest.raises(CMoEError, match="CMOE_AUTO: expected one of measure, table, got 'fastest'"):
        cmoe.moe_project(x, experts, index, weight)


def test_candidates_leave_out_what_cannot_or_should_not_run() -> None:
    experts, x, _, _ = _inputs(num_experts=8, top_k=2)
    names, skipped = auto.candidates(x, experts, top_k=2)
    assert names == ["grouped_mm", "sorted"]
    assert skipped == {"dense": "computes all 8 experts for every token (k = 2)"}
    experts, x, _, _ = _inputs(dtype=torch.float64)
    names, skipped = auto.candidates(x, experts, top_k=2)
    assert names == ["dense", "sorted"] and "not float64" in skipped["grouped_mm"]


def test_a_candidate_that_raises_is_skipped(fresh_selector: None, monkeypatch: pytest.MonkeyPatch) -> None:
    from cmoe.dispatch import Backend

    def broken(*_):
        raise RuntimeError("no kernel for this")

    original = cmoe.BACKENDS.get("dense")
    monkeypatch.setitem(cmoe.BACKENDS._items, "dense", Backend("dense", broken))
    auto.configure_auto(timer=FakeTimer({"sorted": 2.0, "grouped_mm": 3.0}))
    experts, x, index, weight = _inputs()
    cmoe.moe_project(x, experts, index, weight)
    (choice,) = auto.auto_choices().values()
    assert choice.backend == "sorted" and choice.skipped == {"dense": "raised RuntimeError: no kernel for this"}
    assert original.fn is not broken


def test_training_measurement_leaves_parameter_grads_alone(fresh_selector: None) -> None:
    auto.configure_auto(timer=FakeTimer({"sorted": 2.0, "grouped_mm": 1.0, "dense": 3.0}))
    experts, x, index, weight = _inputs()
    experts.requires_grad_()
    x.requires_grad_()
    cmoe.moe_project(x, experts, index, weight).sum().backward()  # measures (fwd+bwd of each), then runs
    grads = [p.grad.clone() for p in experts.parameters()]
    experts.zero_grad(set_to_none=True)
    cmoe.moe_project(x, experts, index, weight, backend="grouped_mm").sum().backward()
    for got, want in zip(grads, experts.parameters(), strict=True):
        assert torch.equal(got, want.grad)


def test_disk_cache_round_trip(fresh_selector: None, tmp_path) -> None:
    path = tmp_path / "sub" / "auto.json"
    auto.configure_auto(cache_path=path, timer=FakeTimer({"sorted": 4.0, "grouped_mm": 2.0, "dense": 3.0}))
    experts, x, index, weight = _inputs()
    cmoe.moe_project(x, experts, index, weight)
    data = json.loads(path.read_text())
    (key, entry), = data["entries"].items()
    assert data["format"] == auto.CACHE_FORMAT and key.endswith("|T<=64|infer")
    assert entry["backend"] == "grouped_mm" and entry["times_ms"] == {"sorted": 4.0, "grouped_mm": 2.0, "dense": 3.0}
    assert [p.name for p in path.parent.iterdir()] == ["auto.json"]  # the temporary file was renamed away

    def must_not_time(*_):
        raise AssertionError("a cached class was timed again")

    auto.configure_auto(cache_path=path, timer=must_not_time)  # a new process, as far as auto knows
    assert torch.equal(cmoe.moe_project(x, experts, index, weight),
                       cmoe.moe_project(x, experts, index, weight, backend="grouped_mm"))
    assert auto.auto_choices()[key].source == "disk"
    assert "read from the cache file" in auto.auto_choices()[key].explain()


def test_disk_cache_keeps_other_entries_and_survives_a_corrupt_file(fresh_selector: None, tmp_path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "auto.json"
    path.write_text("{not json")
    monkeypatch.setenv(auto.ENV_CACHE, str(path))  # the path from the environment
    auto.configure_auto(timer=FakeTimer({"sorted": 1.0, "grouped_mm": 2.0, "dense": 3.0}))
    experts, x, index, weight = _inputs()
    cmoe.moe_project(x, experts, index, weight)
    cmoe.moe_project(x[:8], experts, index[:8], weight[:8])
    entries = json.loads(path.read_text())["entries"]
    assert sorted(k.split("|")[-2] for k in entries) == ["T<=64", "T<=8"]
    assert {e["backend"] for e in entries.values()} == {"sorted"}


def test_nothing_is_timed_while_compiling(fresh_selector: None) -> None:
    timer = auto.configure_auto(timer=FakeTimer({"sorted": 1.0, "grouped_mm": 1.0, "dense": 1.0})).timer
    experts, x, index, weight = _inputs(top_k=4)

    def project(x):
        return cmoe.moe_project(x, experts, index, weight)

    torch.compile(project, backend="eager")(x)
    assert timer.calls == []


def test_tokens_bucket_rounds_up_to_a_power_of_two() -> None:
    assert [auto.tokens_bucket(t) for t in (1, 2, 3, 4, 5, 1000, 1024, 1025)] == [1, 2, 4, 4, 8, 1024, 1024, 2048]


def test_cmoe_bench_auto_prints_the_choice_and_the_times(capsys: pytest.CaptureFixture, tmp_path) -> None:
    from cmoe.cli import main

    cache = tmp_path / "auto.json"
    assert main(["bench", "--tokens", "32", "--in-features", "16", "--out-features", "8", "--experts", "4",
                 "--top-k", "2", "--rounds", "1", "--auto", "--cache", str(cache)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith("inference: cpu:") and lines[0].endswith("|E4|k2|w16x8x8|bias|gelu|T<=32|infer")
    assert lines[2].startswith("training: ") and lines[2].endswith("|T<=32|train")
    for line in (lines[1], lines[3]):
        assert line.startswith("  auto picks ") and "(fastest measured: " in line
        for name in ("sorted", "grouped_mm", "dense"):
            assert f"{name} " in line.split("fastest measured: ")[1]
    assert len(json.loads(cache.read_text())["entries"]) == 2


def test_a_bad_mode_for_a_recorded_run_says_what_is_accepted(tmp_path) -> None:
    with pytest.raises(CMoEError, match="auto mode: expected one of measure, table, got 'fastest'"):
        with auto.choices_recorded_in(tmp_path / "auto.json", mode="fastest"):
            pass


def test_a_recorded_run_keeps_every_setting_of_the_selector_it_replaces(tmp_path) -> None:
    previous = auto.configure_auto(rounds=4, tie_margin=0.2, tie_rounds=3, tie_keep=0.07)
    try:
        with auto.choices_recorded_in(tmp_path / "auto.json") as inside:
            kept = (inside.rounds, inside.tie_margin, inside.tie_rounds, inside.tie_keep)
        assert kept == (4, 0.2, 3, 0.07)
    finally:
        auto.configure_auto()
    assert previous is not auto.selector()
