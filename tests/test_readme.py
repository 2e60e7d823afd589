"""The README's example runs as written (into a temp dir instead of /tmp/cmoe-connector)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs(tmp_path, capsys) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    code = blocks[0].replace("/tmp/cmoe-connector", str(tmp_path / "connector"))
    assert len(code.strip().splitlines()) <= 12
    exec(compile(code, "README.md", "exec"), {})
    assert "torch.Size([2, 64, 256])" in capsys.readouterr().out
    assert (tmp_path / "connector" / "model.safetensors").is_file()
