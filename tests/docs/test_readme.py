"""Every python example in the README runs as written (file paths redirected to a temp dir)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import cmoe

pytestmark = pytest.mark.smoke  # in the newest-versions stage (.ci/latest)

README = Path(__file__).resolve().parents[2] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_the_three_examples() -> None:
    assert len(BLOCKS) == 3
    assert len(BLOCKS[0].strip().splitlines()) <= 12
    assert len(BLOCKS[1].strip().splitlines()) < 20


def test_quickstart_example(tmp_path, capsys) -> None:
    code = BLOCKS[0].replace("/tmp/cmoe-connector", str(tmp_path / "connector"))
    exec(compile(code, "README.md", "exec"), {})
    assert "torch.Size([2, 64, 256])" in capsys.readouterr().out
    assert (tmp_path / "connector" / "model.safetensors").is_file()


def test_plugin_example_registers_a_router_by_name() -> None:
    namespace: dict = {}
    exec(compile(BLOCKS[1], "README.md", "exec"), namespace)
    module = type("Plugin", (), {"cmoe_register_routers": staticmethod(namespace["cmoe_register_routers"])})
    cmoe.register_plugin(module, name="readme_sharp")
    try:
        connector = cmoe.CMoEConnector(cmoe.CMoEConfig(4, 4, router="sharp"))
        assert connector.router.top_k == 1
    finally:
        cmoe.unregister_plugin("readme_sharp")
    with pytest.raises(cmoe.UnknownNameError):
        cmoe.get_router("sharp")


def test_attach_example() -> None:
    exec(compile(BLOCKS[2], "README.md", "exec"), {})
