"""The tug-of-war analysis on a tiny trained model: live during training and on a checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cmoe.reference_models.unimed.analysis.analyze import analyze_checkpoint
from cmoe.reference_models.unimed.training.train import Trainer

from unimed_tiny import test_config as tiny_config

PLOTS = {"index_curves.png", "routing.png", "parameter_histograms.png", "cosine_all.png", "cosine_router.png",
         *(f"cosine_expert_{e}.png" for e in range(5))}


@pytest.mark.slow
def test_live_analysis_and_checkpoint_analysis_write_every_plot_and_the_json(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cmoe.reference_models.unimed.analysis import plots

    plotted_at: list[int] = []
    monkeypatch.setattr(plots, "plot_index_curves",
                        lambda report, path, _plot=plots.plot_index_curves:
                        plotted_at.append(report.steps[-1].step) or _plot(report, path))
    config = tiny_config(tmp_path, train__steps=4, train__save_every=4, train__analyze_every=2,
                         train__analyze_batches_per_task=1)
    Trainer(config).train()
    live = json.loads((tmp_path / "tug_of_war" / "tug_of_war.json").read_text())
    assert [s["step"] for s in live["steps"]] == [0, 2, 4]
    assert plotted_at == [4]  # the JSON at every analysis, the plots (slow) with the checkpoint at step 4
    assert PLOTS <= {p.name for p in (tmp_path / "tug_of_war").iterdir()}
    last = live["steps"][-1]
    assert set(last["routing"]) == {"vqa", "report", "rec", "reg", "cls"}
    assert last["parameters"]["expert_0"]["update_norm"] > 0
    cosine = last["gradients"]["all"]["cosine"]
    assert len(cosine) == 5 and all(abs(cosine[i][i] - 1) < 1e-9 for i in range(5))

    report, paths = analyze_checkpoint(config, out_dir=tmp_path / "analysis", batches_per_task=1)
    assert {p.name for p in paths} == PLOTS | {"tug_of_war.json"}
    from cmoe.reference_models.unimed.cli import main

    small = ["--output-dir", str(tmp_path), "--set", "data.synthetic.num_images=120",
             "--set", "data.synthetic.qa_questions=40", "--set", "data.synthetic.eval_images=20",
             "--set", "train.batch_size=4"]
    assert main(["analyze", *small, "--out", str(tmp_path / "cli"), "--batches-per-task", "1"]) == 0
    assert PLOTS | {"tug_of_war.json"} <= {p.name for p in (tmp_path / "cli").iterdir()}
    assert all(p.stat().st_size > 1000 for p in paths if p.suffix == ".png")
    step = report.steps[0]
    assert step.step == 4 and step.parameters["router"].relative_update > 0
    assert 0 <= step.gradients["all"].direction.conflict <= 1


@pytest.mark.slow
def test_checkpoint_analysis_reads_the_saved_initialisation_instead_of_rebuilding(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cmoe.reference_models.unimed.analysis import analyze
    from cmoe.reference_models.unimed.model.checkpoint import CONNECTOR_INIT

    config = tiny_config(tmp_path, train__steps=2, train__save_every=2)
    Trainer(config).train()
    assert (tmp_path / CONNECTOR_INIT).is_file()

    def no_rebuild(*args, **kwargs):
        raise AssertionError("analysis rebuilt the model although the run saved its initialisation")

    with monkeypatch.context() as patch:
        patch.setattr(analyze, "build_model", no_rebuild)
        saved, _ = analyze_checkpoint(config, out_dir=tmp_path / "saved", batches_per_task=1)
    (tmp_path / CONNECTOR_INIT).unlink()
    rebuilt, _ = analyze_checkpoint(config, out_dir=tmp_path / "rebuilt", batches_per_task=1)
    for group, stats in rebuilt.steps[0].parameters.items():
        assert stats.update_norm > 0
        assert saved.steps[0].parameters[group].update_norm == pytest.approx(stats.update_norm, rel=1e-6), group


@pytest.mark.slow
def test_mlp_connector_analysis_has_projector_group_and_no_routing(tmp_path: Path) -> None:
    config = tiny_config(tmp_path, train__steps=1, train__save_every=1)
    config.model.connector.preset, config.model.connector.options = "mlp", {"hidden_features": 64}
    Trainer(config).train()
    report, paths = analyze_checkpoint(config, out_dir=tmp_path / "analysis", batches_per_task=1)
    assert set(report.steps[0].gradients) == {"projector", "all"} and not report.steps[0].routing
    assert {p.name for p in paths} >= {"cosine_projector.png", "index_curves.png", "tug_of_war.json"}


@pytest.mark.slow
def test_experiment_runs_variants_over_seeds_and_writes_the_table_and_plots(tmp_path: Path, monkeypatch) -> None:
    """The tug_of_war experiment end to end at a tiny budget: variants (one a plugin's router), paired tests,
    routing maps, the task study (a nested pair and single-task runs), the plots; a second call reuses every
    finished run."""
    from cmoe.reference_models.unimed.training import train
    from cmoe.reference_models.unimed.experiments.report import format_experiment
    from cmoe.reference_models.unimed.experiments.runner import load_experiment, run_experiment

    assert set(load_experiment("cmoe_vs_mlp").variants) == {"mlp", "cmoe_original", "cmoe_token_topk", "cmoe_task"}
    spec = load_experiment("tug_of_war")
    spec.seeds = [0, 1]
    spec.task_study["nested"] = ["cls", "report"]
    small = {"data": {"synthetic": {"num_images": 30, "qa_questions": 10, "eval_images": 6}},
             "train": {"steps": 4, "warmup_steps": 2, "analyze_every": 2, "analyze_batches_per_task": 1,
                       "batch_size": 4},
             "eval": {"limit_per_task": 2, "max_new_tokens": 4, "coco_caption": False}}
    summary = run_experiment(spec, tmp_path, small, variants=["mlp", "lsh_hash"])
    assert set(summary["runs"]) == {"mlp", "lsh_hash"}
    assert [r["seed"] for r in summary["runs"]["mlp"]] == [0, 1]
    agg = summary["aggregate"]
    assert agg["lsh_hash"]["connector_params"] > agg["mlp"]["connector_params"]
    assert set(agg["mlp"]["tasks"]) == {"qa", "vqa", "report", "rec", "reg", "cls"}
    assert "routing_entropy" in agg["lsh_hash"]["tug_of_war"] and "routing_entropy" not in agg["mlp"]["tug_of_war"]
    assert set(summary["comparisons"]) == {"lsh_hash"}  # mlp_wide did not run: one baseline
    assert summary["comparisons"]["lsh_hash"]["mlp"]["average"]["n"] == 2
    study = summary["task_study"]
    assert study["conflict_by_tasks"]["2"]["tasks"] == ["cls", "report"]
    assert set(study["single_task"]) == {"cls", "report"} and study["single_task"]["cls"]["steps"] == 1
    assert (tmp_path / "task_study" / "single_cls" / "seed1" / "experiment_run.json").is_file()
    table = format_experiment(summary)
    for row in ("| mlp |", "| lsh_hash |", "conflict index", "| lsh_hash (0) | cls |", "| lsh_hash | mlp |",
                "| 2 | cls, report |", "| cls (accuracy) | 1 |"):
        assert row in table
    assert {"results.md", "results.json", "scores.png", "conflict.png", "routing.png", "task_study.png"} <= \
        {p.name for p in tmp_path.iterdir()}

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(train.Trainer, "train", no_training)
    again = run_experiment(spec, tmp_path, small, variants=["mlp", "lsh_hash"])
    assert again["aggregate"] == summary["aggregate"]
    with pytest.raises(Exception, match="not in experiment"):
        run_experiment(spec, tmp_path, small, variants=["nope"])


def test_data_stats_command_prints_imax_statistics(capsys) -> None:
    from cmoe.reference_models.unimed.cli import main

    small = ["--set", "data.synthetic.num_images=40", "--set", "data.synthetic.eval_images=5",
             "--set", "data.synthetic.qa_questions=5"]
    assert main(["data-stats", *small]) == 0
    dense = capsys.readouterr().out
    assert "| tasks per image (mean / median / max) | 5.00 / 5 / 5 |" in dense
    assert main(["data-stats", *small, "--set", "data.synthetic.annotation=sparse"]) == 0
    sparse = capsys.readouterr().out
    assert "| entries | " in sparse and "5.00 / 5 / 5" not in sparse
