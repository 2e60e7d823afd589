"""docs/finetune.md runs as written: its code blocks, in order, in one namespace (paths moved to a temp dir)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytest.importorskip("peft")
pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate")

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "finetune.md"
BLOCKS = re.findall(r"```python\n(.*?)```", GUIDE.read_text(), flags=re.S)


def test_the_guide_has_its_four_steps_and_the_trl_subclass() -> None:
    assert len(BLOCKS) == 5 and "class SFTTrainerWithAux(trl.SFTTrainer)" in BLOCKS[3]


@pytest.mark.slow
def test_the_fine_tuning_guide_runs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    namespace: dict = {}
    for index, block in enumerate(BLOCKS):
        code = block.replace("/tmp/cmoe-finetune", str(tmp_path))
        exec(compile(code, f"docs/finetune.md block {index + 1}", "exec"), namespace)
    printed = [line for line in capsys.readouterr().out.splitlines() if re.fullmatch(r"[0-9.e-]+", line.strip())]
    assert len(printed) == 1 and float(printed[0]) > 0  # the logged aux loss
    assert (tmp_path / "model" / "model.safetensors").is_file()
    assert namespace["tokens"].shape[0] == 4
    import cmoe

    assert cmoe.attached_model(namespace["reloaded"]) is namespace["reloaded"]
