"""The main-job demo trains for real: losses fall, task-aware CMoE beats the task-blind MLP, CLI works."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from cmoe.config import CMoEConfig, MLPConnectorConfig
from cmoe.connector import build_connector
from cmoe.demo import MultiTaskProblem, evaluate, main, train


def test_training_lowers_every_task_loss() -> None:
    problem = MultiTaskProblem(8, 12, 8, num_tasks=3, aggregate=2)
    for config in (MLPConnectorConfig(8, 12, aggregate_tokens=2),
                   CMoEConfig(8, 12, num_experts=3, router="task_token", num_tasks=3, aggregate_tokens=2)):
        torch.manual_seed(0)
        model = build_connector(config)
        before = evaluate(model, problem, seed=0)
        after = train(model, problem, steps=150, batch=8, lr=1e-2, seed=0)
        assert all(a < 0.8 * b for a, b in zip(after, before)), (config, before, after)


def test_demo_cmoe_beats_task_blind_mlp_on_conflicting_tasks(capsys) -> None:
    results = main([])
    mean = {name: sum(v) / len(v) for name, v in results.items()}
    assert mean["cmoe"] < 0.9 * mean["mlp"], mean
    printed = capsys.readouterr().out
    assert "held-out MSE per task" in printed and "tokens per expert, by task" in printed

@pytest.mark.smoke

def test_cli_runs_the_demo_and_rejects_unknown_commands() -> None:
    done = subprocess.run([sys.executable, "-m", "cmoe", "demo", "--steps", "5"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "| connector |" in done.stdout
    bad = subprocess.run([sys.executable, "-m", "cmoe", "bogus"], capture_output=True, text=True)
    assert bad.returncode == 2 and "invalid choice: 'bogus'" in bad.stderr
