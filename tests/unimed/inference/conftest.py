"""The tiny run the inference tests ask (the API, the command line, the web demo): trained once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from cmoe.reference_models.unimed.inference.predictor import UniMedPredictor
from cmoe.reference_models.unimed.training.train import Trainer

from unimed_tiny import test_config as tiny_config


@pytest.fixture(scope="session")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("inference_run")
    Trainer(tiny_config(folder, train__steps=4, train__save_every=4)).train()
    return folder


@pytest.fixture(scope="session")
def predictor(run: Path) -> UniMedPredictor:
    return UniMedPredictor.from_run(run)
