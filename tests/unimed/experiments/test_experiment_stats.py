"""The experiments' statistics on hand-made numbers, checked against values worked out by hand (closed forms,
enumerated sign patterns), not against the code's own output."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest

from cmoe.errors import CMoEError
from cmoe.reference_models.unimed.experiments.report import format_experiment, routing_by_variant, task_separation
from cmoe.reference_models.unimed.experiments.runner import aggregate, compare, load_experiment, resolve_variants, run_config
from cmoe.reference_models.unimed.experiments.stats import mean_std, paired_test
from cmoe.reference_models.unimed.experiments.task_study import subset_overrides


def student_t_two_sided_p_df4(t: float) -> float:
    """Closed form of Student's t CDF at 4 degrees of freedom: F(t) = 1/2 + 3/4 (x − x³/3), x = t / √(t² + 4)."""
    x = t / math.sqrt(t * t + 4)
    return 2 * (1 - (0.5 + 0.75 * (x - x ** 3 / 3)))


def sign_flip_p(diffs: list[float]) -> float:
    """Two-sided exact sign-flip p by enumerating every sign pattern (|mean| at least the observed one)."""
    observed = abs(sum(diffs))
    patterns = list(itertools.product((1, -1), repeat=len(diffs)))
    hits = sum(abs(sum(s * abs(d) for s, d in zip(signs, diffs))) >= observed - 1e-12 for signs in patterns)
    return hits / len(patterns)

@pytest.mark.smoke

def test_paired_test_on_hand_made_numbers() -> None:
    test = paired_test([2, 4, 6, 8, 10], [1, 2, 3, 4, 5])  # differences 1..5: mean 3, sample sd √2.5
    assert test.n == 5 and test.mean_diff == 3.0 and math.isclose(test.std_diff, math.sqrt(2.5))
    assert math.isclose(test.t, 3 / (math.sqrt(2.5) / math.sqrt(5)))  # 4.2426
    assert math.isclose(test.p_t, student_t_two_sided_p_df4(test.t), rel_tol=1e-9)
    assert math.isclose(test.p_t, 0.013236, abs_tol=1e-6)
    assert test.p_sign_flip == 2 / 32  # every difference positive: only all-plus and all-minus are as extreme

@pytest.mark.smoke

def test_sign_flip_p_counts_every_pattern_at_least_as_extreme() -> None:
    a, b = [1.0, 0.5, 2.0, -0.5], [0.0, 0.0, 0.0, 0.0]
    test = paired_test(a, b)
    assert test.p_sign_flip == sign_flip_p(a) == 6 / 16
    assert math.isclose(test.mean_diff, 0.75)
    diffs = [0.3, -0.1, 0.25, 0.05, -0.2]
    assert math.isclose(paired_test(diffs, [0] * 5).p_sign_flip, sign_flip_p(diffs))


def test_equal_runs_and_bad_lengths() -> None:
    same = paired_test([0.5, 0.7, 0.9], [0.5, 0.7, 0.9])
    assert same.t is None and same.p_t is None and same.p_sign_flip == 1.0 and same.std_diff == 0
    with pytest.raises(CMoEError, match="same length >= 2"):
        paired_test([1, 2], [1])
    with pytest.raises(CMoEError, match="same length >= 2"):
        paired_test([1], [1])


def test_mean_std_is_the_sample_std_of_the_values_present() -> None:
    assert mean_std([1.0, None, 3.0]) == (2.0, math.sqrt(2))
    assert mean_std([0.4]) == (0.4, 0.0) and mean_std([None]) == (None, None)


def _run(seed: int, scores: dict[str, float], conflict: float, routing: dict | None = None) -> dict:
    tug = {"conflict_mean": conflict, "cv_mean": 0.1}
    if routing:
        tug["routing"] = routing
    return {"seed": seed, "scores": scores, "tug_of_war": tug, "connector_params": 10}


def test_aggregate_and_compare_pair_runs_by_seed() -> None:
    runs = {
        "mlp": [_run(0, {"cls": 0.5, "vqa": 0.3}, 0.2), _run(1, {"cls": 0.6, "vqa": 0.2}, 0.3),
                _run(2, {"cls": 0.4, "vqa": 0.4}, 0.1)],
        # listed in another seed order: pairing must go by seed, not by position
        "moe": [_run(2, {"cls": 0.6, "vqa": 0.4}, 0.05), _run(0, {"cls": 0.7, "vqa": 0.3}, 0.1),
                _run(1, {"cls": 0.7, "vqa": 0.3}, 0.2)],
    }
    agg = aggregate(runs)
    assert agg["mlp"]["average"] == mean_std([0.4, 0.4, 0.4])
    assert math.isclose(agg["moe"]["tasks"]["cls"][0], 2 / 3) and math.isclose(agg["moe"]["tasks"]["cls"][1],
                                                                                  math.sqrt(1 / 300))
    result = compare(runs, ["mlp"])
    assert set(result) == {"moe"} and set(result["moe"]) == {"mlp"}
    cls = result["moe"]["mlp"]["tasks"]["cls"]  # differences 0.2, 0.1, 0.2 (seeds 0, 1, 2)
    assert math.isclose(cls["mean_diff"], 0.5 / 3)
    average = result["moe"]["mlp"]["average"]  # seed averages: moe 0.5, 0.5, 0.5 vs mlp 0.4, 0.4, 0.4
    assert math.isclose(average["mean_diff"], 0.1) and average["t"] is None and average["p_sign_flip"] == 0.25
    conflict = result["moe"]["mlp"]["conflict_mean"]  # −0.1, −0.1, −0.05
    assert math.isclose(conflict["mean_diff"], -0.25 / 3)
    both = compare(runs, ["mlp", "moe"])  # two baselines: their pair is compared once, not both ways
    assert set(both) == {"moe"} and set(both["moe"]) == {"mlp"}
    table = format_experiment({"name": "x", "seeds": [0, 1, 2], "runs": runs, "aggregate": agg,
                               "comparisons": result})
    assert "| moe | mlp | **+10.0 (p n/a / 0.250)** |" in table


def test_routing_maps_come_from_one_seed_and_separation_is_the_mean_pairwise_total_variation() -> None:
    one_hot = {"cls": {"weights": [1.0, 0.0], "normalized_entropy": 0.0},
               "vqa": {"weights": [0.0, 1.0], "normalized_entropy": 0.0}}
    alike = {"cls": {"weights": [0.5, 0.5], "normalized_entropy": 1.0},
             "vqa": {"weights": [0.5, 0.5], "normalized_entropy": 1.0}}
    runs = {"moe": [_run(3, {"cls": 1.0}, 0.1, one_hot), _run(4, {"cls": 1.0}, 0.1, alike)],
            "mlp": [_run(3, {"cls": 1.0}, 0.1)]}
    routing = routing_by_variant({"runs": runs})
    assert set(routing) == {"moe"} and routing["moe"]["seed"] == 3
    assert routing["moe"]["tasks"]["cls"]["weights"] == [1.0, 0.0]  # seed 3's map, not an average over seeds
    assert routing["moe"]["tasks"]["cls"]["entropy"] == (0.5, math.sqrt(0.5))
    assert routing["moe"]["separation"] == (0.5, math.sqrt(0.5))  # TV 1 (disjoint) and 0 (alike)
    three = {t: {"weights": w} for t, w in (("a", [1, 0, 0]), ("b", [0, 1, 0]), ("c", [0.5, 0.5, 0]))}
    assert math.isclose(task_separation(three), (1 + 0.5 + 0.5) / 3)


def test_the_tug_of_war_experiment_is_what_the_issue_asks(tmp_path: Path) -> None:
    from cmoe.connector import CONNECTORS
    from cmoe.reference_models.unimed.model.assembly import connector_config

    spec = load_experiment("tug_of_war")
    assert len(spec.seeds) >= 5 and spec.baselines == ["mlp", "mlp_wide"]
    assert {"mlp", "mlp_wide", "cmoe_original", "cmoe_token_topk", "cmoe_task", "cmoe_hard"} <= set(spec.variants)

    def params(variant: str) -> int:
        connector = run_config(spec, variant, 0, tmp_path).model.connector
        config = connector_config(connector.preset, 32, 64, 4, connector.options)
        return sum(p.numel() for p in CONNECTORS[config.connector_type](config).parameters())

    # mlp_wide is the parameter-matched control of the CMoE; mlp is as narrow as one expert
    assert abs(params("mlp_wide") - params("cmoe_original")) / params("cmoe_original") < 0.01
    assert params("mlp") < params("cmoe_hard") / 4


def test_single_task_runs_see_as_many_examples_of_their_task_as_the_joint_run(tmp_path: Path) -> None:
    spec = load_experiment("tug_of_war")
    joint = run_config(spec, "mlp", 0, tmp_path)
    ratios = joint.data.ratios  # qa 1, vqa 2, report 2, rec 2, reg 2, cls 1: sum 10
    single = subset_overrides(joint, ["vqa"], equal_exposure=True)
    assert single["data"]["synthetic"]["tasks"] == ["qa", "vqa"]
    assert single["train"]["steps"] == round(joint.train.steps * 3 / 10)
    config = run_config(spec, "mlp", 0, tmp_path, run_dir=tmp_path / "single", extra=single)
    assert config.data.ratios == {"synthetic_qa": ratios["synthetic_qa"], "synthetic_vqa": ratios["synthetic_vqa"]}
    # vqa's batches: a share 2/3 of the single run's steps equals its share 2/10 of the joint run's
    assert math.isclose(config.train.steps * 2 / 3, joint.train.steps * 2 / 10, abs_tol=1)
    nested = subset_overrides(joint, ["cls", "report"], equal_exposure=False)
    assert "train" not in nested and nested["data"]["synthetic"]["tasks"] == ["qa", "report", "cls"]


def test_a_registered_router_is_a_variant_and_an_unknown_name_lists_both(tmp_path: Path) -> None:
    spec = load_experiment("tug_of_war")
    assert resolve_variants(spec, ["mlp", "lsh_hash"]) == ["mlp", "lsh_hash"]  # the example plugin's router
    connector = run_config(spec, "lsh_hash", 0, tmp_path).model.connector
    assert connector.options["router"] == "lsh_hash" and connector.options["expert_hidden"] == 8
    with pytest.raises(CMoEError, match=r"not registered routers.*variants: \[.*'mlp'.*routers: \[.*'token_topk'"):
        resolve_variants(spec, ["no_such_router"])


def test_a_run_folder_of_another_config_is_refused_not_resumed_or_reused(tmp_path: Path) -> None:
    import json

    from cmoe.io import write_json
    from cmoe.reference_models.unimed.experiments.runner import RUN_RECORD, run_one

    spec = load_experiment("tug_of_war")
    config = run_config(spec, "mlp", 0, tmp_path)
    run_dir = Path(config.output_dir)
    other = run_config(spec, "mlp", 0, tmp_path, {"train": {"lr": 1e-4}}).to_dict()
    write_json(run_dir / "config.json", other)  # an interrupted run with another learning rate
    with pytest.raises(CMoEError, match=r"holds a run of another config \(differs in \['train.lr'\]\)"):
        run_one(config, 0)
    (run_dir / "config.json").unlink()
    write_json(run_dir / RUN_RECORD, {"config": other, "scores": {}})  # a finished one
    with pytest.raises(CMoEError, match="another --output-dir"):
        run_one(config, 0)
    record = {"config": config.to_dict(), "scores": {"cls": 0.5}, "seed": 0}
    write_json(run_dir / RUN_RECORD, record)
    assert run_one(config, 0) == json.loads((run_dir / RUN_RECORD).read_text())  # the same config: reused
