"""No top-level folder of the repository shadows another distribution, from the repository root.

Python puts the current directory first on ``sys.path`` for ``python -m``, ``torchrun -m`` and ``pytest``, so
from the root a bare ``import kernels`` used to find our ``kernels/`` before Hugging Face's ``kernels`` (a
transformers dependency), and transformers failed (``cannot import name 'CUDAProperties' from 'kernels'``).
Each source folder (``kernels/``, ``plugins/``, ``reference_models/``, ``benchmarks/``) is importable only as
``cmoe.<folder>``; imported under its bare name it hands over to the installed distribution of that name, or
raises ModuleNotFoundError (`cmoe.source_folders`). Every check runs in a fresh interpreter started in the root.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cmoe.source_folders import SOURCE_FOLDERS

pytestmark = pytest.mark.smoke

ROOT = Path(__file__).resolve().parents[2]


def top_level_folders() -> list[str]:
    """The repository's top-level folders whose names Python could import (tracked by git where it is there)."""
    try:
        files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        names = {line.split("/", 1)[0] for line in files.splitlines() if "/" in line}
    except (OSError, subprocess.CalledProcessError):
        names = {path.name for path in ROOT.iterdir() if path.is_dir()}
    return sorted(name for name in names if name.isidentifier() and (ROOT / name).is_dir())


def run_in_root(code: str, pythonpath: Path | None = None) -> dict:
    """Run `code` as ``python -c`` in the repository root (so '' is first on sys.path); it prints one JSON line."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


PROBE = """
import importlib, json, sys
assert sys.path[0] == "", sys.path[:2]
found = {}
for name in NAMES:
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as error:
        found[name] = {"error": str(error)}
    else:
        found[name] = {"file": getattr(module, "__file__", None), "path": list(getattr(module, "__path__", [])),
                       "who": getattr(module, "WHO", None)}
print(json.dumps(found))
"""


def probe(names: list[str], pythonpath: Path | None = None) -> dict:
    return run_in_root(f"NAMES = {names!r}\n{PROBE}", pythonpath)


def inside_repository(entry: dict) -> bool:
    """Whether the module was found in one of the repository's own folders (not in a venv kept inside it)."""
    places = [Path(place).resolve() for place in [entry.get("file")] + entry.get("path", []) if place]
    return any(place.is_relative_to(ROOT) and place.relative_to(ROOT).parts[0] in top_level_folders()
               for place in places)


def test_every_top_level_package_is_a_guarded_source_folder_or_cmoe() -> None:
    """A new top-level folder with an ``__init__.py`` must be added to SOURCE_FOLDERS (and get the guard)."""
    folders = top_level_folders()
    assert {"cmoe", "kernels", "plugins", "reference_models", "benchmarks", "tests"} <= set(folders)
    packages = {name for name in folders if (ROOT / name / "__init__.py").is_file()}
    assert packages == {"cmoe"} | set(SOURCE_FOLDERS)
    for name, dotted in SOURCE_FOLDERS.items():
        assert dotted == f"cmoe.{name}"
        assert "source_folders.py" in (ROOT / name / "__init__.py").read_text(), f"{name}/__init__.py has no guard"


def test_bare_names_never_resolve_into_the_repository() -> None:
    """From the root: ``kernels`` is Hugging Face's, the other source folders are not importable at all."""
    names = [name for name in top_level_folders() if name != "cmoe"]
    found = probe(names)
    for name in SOURCE_FOLDERS:
        assert not inside_repository(found[name]), (name, found[name])
    hf_kernels = found["kernels"]
    assert "file" in hf_kernels and "site-packages" in hf_kernels["file"], hf_kernels
    for name in set(SOURCE_FOLDERS) - {"kernels"}:
        assert found[name] == {"error": f"No module named {name!r}: the repository's {name}/ folder is the "
                                        f"source of 'cmoe.{name}', not a top-level package"}
    for name in set(names) - set(SOURCE_FOLDERS):  # tests/, docs/: no __init__, at most an empty namespace
        assert found[name].get("file") is None or not inside_repository(found[name]), (name, found[name])


def test_an_installed_distribution_of_the_same_name_always_wins(tmp_path: Path) -> None:
    """Whatever PyPI ships under one of our folder names (``benchmarks`` exists there) is what the name means."""
    names = [name for name in top_level_folders() if name not in ("cmoe", "kernels")]
    for name in names:
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"WHO = 'installed {name}'\n")
        (tmp_path / name / "sub.py").write_text("")
    found = probe(names + [f"{name}.sub" for name in names], pythonpath=tmp_path)
    for name in names:
        assert found[name]["who"] == f"installed {name}", (name, found[name])
        assert Path(found[f"{name}.sub"]["file"]).parent == tmp_path / name


def test_transformers_and_hf_kernels_work_from_the_root_beside_cmoe_kernels() -> None:
    """The failure the issue reported: transformers imports ``kernels`` names; our kernels are cmoe.kernels."""
    found = run_in_root(
        "import json, kernels, transformers\n"
        "import transformers.integrations.hub_kernels\n"
        "from kernels import get_kernel, LayerRepository\n"
        "import cmoe.kernels, cmoe.plugins, cmoe.reference_models.unimed, cmoe.benchmarks.cases\n"
        "print(json.dumps({'hf': kernels.__file__, 'ours': cmoe.kernels.__file__,\n"
        "                  'api': callable(cmoe.kernels.is_available)}))")
    assert "site-packages" in found["hf"]
    assert Path(found["ours"]) == ROOT / "kernels" / "__init__.py" and found["api"]


def test_the_command_line_runs_as_python_m_from_the_root() -> None:
    """``python -m cmoe`` (and so ``torchrun -m cmoe``) puts the root first on sys.path: plugins still load."""
    done = subprocess.run([sys.executable, "-m", "cmoe", "plugins", "list"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("triton", "task_token", "hf_clip", "lsh_hash"):
        assert name in done.stdout
