"""The wheel ships what users need: built from the repository's files, installed with the example plugin into a
clean virtual environment outside the repository (the lock's versions, ``cmoe[unimed]``: no triton, no pytest),
and run from a folder outside it: entry points (built-ins, the recipe, the example plugin), the package data
(the built-in recipe configs, the shipped pretrained tiny encoder and LLM) and the command line.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE_PLUGIN = ROOT / "plugins" / "examples" / "cmoe-example-router"
TORCH = next(line for line in (ROOT / ".ci" / "torch-cpu.txt").read_text().splitlines()
             if line and not line.startswith("#"))  # the CPU wheel every set-up installs first


def run(*command: str | Path, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    done = subprocess.run([str(part) for part in command], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done


def source_copy(destination: Path) -> Path:
    """The files git would commit (tracked, or new and not ignored), so no stale build/ output leaks in."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        if (ROOT / name).is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, destination / name)
    return destination


@pytest.fixture(scope="module")
def core_only(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """``(bin folder of a clean venv holding cmoe without extras + the example plugin, a work folder outside the
    repository, the cmoe wheel)``."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("building the wheel from the repository's files needs git and a clone")
    tmp = tmp_path_factory.mktemp("wheel")
    source = source_copy(tmp / "source")
    wheels = tmp / "wheels"
    for project in (source, source / EXAMPLE_PLUGIN.relative_to(ROOT)):  # with this venv's pinned setuptools
        run(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", wheels,
            project, cwd=tmp)
    venv.create(tmp / "venv", with_pip=True)
    bin_dir = tmp / "venv" / "bin"
    run(*pip_install(bin_dir), TORCH, cwd=tmp)
    cmoe_wheel = next(wheels.glob("cmoe-*.whl"))
    run(*pip_install(bin_dir), "-c", ROOT / "constraints.txt", cmoe_wheel,
        next(wheels.glob("cmoe_example_router-*.whl")), cwd=tmp)
    work = tmp / "work"
    work.mkdir()
    return bin_dir, work, cmoe_wheel


@pytest.fixture(scope="module")
def installed(core_only: tuple[Path, Path, Path]) -> tuple[Path, Path]:
    """The same venv after ``pip install 'cmoe[unimed]'`` (the tests that need the core alone run first)."""
    bin_dir, work, cmoe_wheel = core_only
    run(*pip_install(bin_dir), "-c", ROOT / "constraints.txt", f"{cmoe_wheel}[unimed]", cwd=work)
    return bin_dir, work


def pip_install(bin_dir: Path) -> list[str | Path]:
    return [bin_dir / "python", "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]


@pytest.mark.slow
def test_without_extras_the_core_runs_and_the_recipe_says_what_to_install(core_only) -> None:
    bin_dir, work, _ = core_only
    listing = run(bin_dir / "cmoe", "plugins", "list", cwd=work).stdout
    assert "unimed_recipe (cmoe 0.1.0)" in listing and "lsh_hash" in listing
    done = subprocess.run([bin_dir / "cmoe", "unimed", "train", "--config", "tiny"], cwd=work, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 2 and done.stdout == "", done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("error: cmoe unimed needs cmoe[unimed]: transformers is not installed; ")
    assert "pyyaml is not installed" in done.stderr and "pip install 'cmoe[unimed]'" in done.stderr
    tiny = subprocess.run([bin_dir / "python", "-c", "from cmoe.plugins.tiny import tiny_llava; tiny_llava()"],
                          cwd=work, capture_output=True, text=True, timeout=300)
    assert tiny.returncode == 1 and tiny.stderr.splitlines()[-1] == (
        "cmoe.errors.CMoEError: tiny_llava needs cmoe[hf]: transformers is not installed; peft is not installed. "
        "Install it with pip install 'cmoe[hf]' (from a clone: pip install -e '.[hf]')")


@pytest.mark.slow
def test_the_installed_wheel_is_the_one_imported(installed: tuple[Path, Path]) -> None:
    bin_dir, work = installed
    where = run(bin_dir / "python", "-c", "import cmoe, cmoe.kernels, cmoe.plugins, cmoe.reference_models.unimed;"
                "print(cmoe.__file__); print(cmoe.kernels.__file__)", cwd=work).stdout.split()
    for path in where:
        assert "site-packages" in path and not Path(path).is_relative_to(ROOT), path


@pytest.mark.slow
def test_entry_points_ship_with_their_distributions(installed: tuple[Path, Path]) -> None:
    bin_dir, work = installed
    listing = run(bin_dir / "cmoe", "plugins", "list", cwd=work).stdout
    for origin in ("builtin_plugins (cmoe 0.1.0)", "triton_kernels (cmoe 0.1.0)", "unimed_recipe (cmoe 0.1.0)",
                   "example_router (cmoe-example-router 0.1.0)"):
        assert origin in listing, origin
    for name in ("lsh_hash", "task_token", "hf_clip", "hf_causal_lm", "grouped_mm", "unimed"):
        assert name in listing, name


@pytest.mark.slow
def test_a_tiny_budget_train_and_eval_with_the_shipped_configs_and_weights(installed: tuple[Path, Path]) -> None:
    """``--config tiny`` reads the packaged YAML and the packaged pretrained encoder and LLM."""
    bin_dir, work = installed
    small = ["--set", "data.synthetic.num_images=40", "--set", "data.synthetic.eval_images=6",
             "--set", "train.steps=2", "--set", "train.progress=false", "--set", "eval.limit_per_task=2",
             "--set", "eval.max_new_tokens=4", "--set", "eval.coco_caption=false"]
    trained = run(bin_dir / "cmoe", "unimed", "train", "--config", "tiny", "--output-dir", "run", *small, cwd=work)
    assert "trained to step 2" in trained.stdout
    evaluated = run(bin_dir / "cmoe", "unimed", "eval", "--config", "tiny", "--output-dir", "run", *small, cwd=work)
    assert "| cls |" in evaluated.stdout and len(list((work / "run" / "eval").glob("step_*/eval.json"))) == 1
    asked = run(bin_dir / "cmoe", "unimed", "predict", "--config", "tiny", "--output-dir", "run", "--example", "1",
                "--task", "rec", "--json", cwd=work)
    answer = json.loads(asked.stdout)
    assert answer["task"] == "rec" and len(answer["routing"]) == 5 and "[refer]" in answer["prompt"]


def test_pyproject_lists_every_package_of_the_source_folders() -> None:
    """A subpackage missing from pyproject.toml's ``packages`` would be left out of the wheel (and of the editable
    install's mapping), silently; benchmarks/suite/ (the pytest-benchmark files) is not a package."""
    import tomllib

    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {dotted: ROOT / folder for dotted, folder in setuptools["package-dir"].items()}
    found = set()
    for dotted, folder in folders.items():
        for init in folder.rglob("__init__.py"):
            if "examples" not in init.parts and "build" not in init.relative_to(ROOT).parts:
                relative = init.parent.relative_to(folder).parts
                found.add(".".join((dotted, *relative)))
    data_only = {name for name in setuptools["packages"] if "configs" in name or "pretrained" in name}
    assert found == set(setuptools["packages"]) - data_only
