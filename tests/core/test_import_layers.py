"""Imports point one way, between cmoe's packages and between the layers of the Uni-Med recipe, so the house stays
as built (docs/architecture.md draws it). Read from the source with `ast`, imports inside functions included;
a failure names the file, the line and the rule. The core's own rules are in tests/core/test_core_imports.py.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = {"cmoe": "cmoe", "cmoe.kernels": "kernels", "cmoe.plugins": "plugins",
           "cmoe.reference_models": "reference_models", "cmoe.benchmarks": "benchmarks"}

# package -> the cmoe packages it may import besides itself and the core
ALLOWED_PACKAGES = {
    "cmoe": set(),
    "cmoe.kernels": set(),
    "cmoe.plugins": {"cmoe.kernels"},
    "cmoe.reference_models": {"cmoe.plugins", "cmoe.kernels"},
    "cmoe.benchmarks": {"cmoe.plugins", "cmoe.kernels"},
}

UNIMED = "cmoe.reference_models.unimed"
# the recipe's layers, lowest first; a module imports its own layer (its own subpackage) and those below
LAYERS = [
    {"tasks", "prompts", "boxes", "config", "original", "__init__", "instructions", "prompt_style",
     "text_processing"},
    {"data"},
    {"model"},
    {"evaluation"},
    {"analysis"},
    {"training"},
    {"inference"},
    {"experiments", "paper"},
    {"cli"},
    {"plugin"},
]


def module_name(path: Path) -> str:
    """The dotted name a file under one of the source folders is imported as."""
    relative = path.relative_to(ROOT)
    package = next(name for name, folder in FOLDERS.items() if relative.parts[0] == folder)
    parts = [part for part in relative.with_suffix("").parts[1:] if part != "__init__"]
    return ".".join([package, *parts])


def cmoe_imports(path: Path) -> list[tuple[int, str]]:
    """``(line, module)`` for every import of a ``cmoe`` module in `path`, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            found += [(node.lineno, name) for name in names if name.split(".")[0] == "cmoe"]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.split(".")[0] == "cmoe"]
    return found


def package_of(module: str) -> str:
    for package in sorted(FOLDERS, key=len, reverse=True):
        if module == package or module.startswith(package + "."):
            return package
    raise AssertionError(module)


def sources(folder: str) -> list[Path]:
    return sorted(path for path in (ROOT / folder).rglob("*.py") if "examples" not in path.parts
                  and "suite" not in path.parts)


def layer_of(module: str) -> tuple[int, str] | None:
    """``(layer index, subpackage or module)`` of a recipe module, or None outside the recipe."""
    if not (module == UNIMED or module.startswith(UNIMED + ".")):
        return None
    head = module[len(UNIMED) + 1:].split(".")[0] if module != UNIMED else "__init__"
    for index, layer in enumerate(LAYERS):
        if head in layer:
            return index, head
    raise AssertionError(f"{module}: not in any layer of tests/core/test_import_layers.py; add its subpackage")


def test_the_layers_name_every_part_of_the_recipe() -> None:
    recipe = ROOT / "reference_models" / "unimed"
    parts = {path.stem if path.is_file() else path.name for path in recipe.iterdir()
             if (path.suffix == ".py") or (path / "__init__.py").is_file()}
    assert parts == set().union(*LAYERS)


@pytest.mark.parametrize("package", sorted(FOLDERS))
def test_packages_import_only_the_packages_below_them(package: str) -> None:
    wrong = []
    for path in sources(FOLDERS[package]):
        for line, target in cmoe_imports(path):
            other = package_of(target)
            if other not in (package, "cmoe") and other not in ALLOWED_PACKAGES[package]:
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {target} ({package} may not import {other})")
    assert not wrong, "\n".join(wrong)


def test_each_layer_of_the_recipe_imports_only_its_own_part_and_the_layers_below() -> None:
    wrong = []
    for path in sources("reference_models/unimed"):
        here = layer_of(module_name(path))
        assert here is not None
        for line, target in cmoe_imports(path):
            there = layer_of(target)
            if there is None:
                continue
            if there[0] > here[0] or (there[0] == here[0] and here[0] > 0 and there[1] != here[1]):
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {target}: layer {there[0]} ({there[1]}) "
                             f"from layer {here[0]} ({here[1]})")
    assert not wrong, "\n".join(wrong)


def test_the_rules_catch_an_import_that_climbs(tmp_path: Path) -> None:
    """The checks are not vacuous: a data module importing training is reported."""
    climbing = tmp_path / "climb.py"
    climbing.write_text(f"def f():\n    from {UNIMED}.training.train import Trainer\n")
    (line, target), = cmoe_imports(climbing)[:1]
    assert line == 2 and layer_of(target)[0] > layer_of(f"{UNIMED}.data.sample")[0]
