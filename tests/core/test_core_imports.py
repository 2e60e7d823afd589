"""The core's imports point one way (issue 22): read from the source with `ast`, nothing is imported.

* no circle between the modules of ``cmoe/`` (``cmoe/__init__.py``, which re-exports everything, left out);
* ``cmoe/registry.py`` is a leaf: it imports no cmoe module but ``cmoe.errors`` (who fills the registries
  installs itself, `cmoe.registry.set_loader`);
* no core module imports the package ``cmoe`` itself (its ``__init__`` imports every module: an upward edge);
* no core module imports ``cmoe.plugins``, ``cmoe.kernels``, ``cmoe.reference_models`` or ``cmoe.benchmarks``:
  the core names them in strings and entry points only;
* an import inside a function names no cmoe module (the package imports its modules on start anyway, so such
  an import can only hide a circle) and carries a comment saying why it is lazy (start-up time).

Imports inside functions and under ``if TYPE_CHECKING:`` count like any other.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.smoke

CORE = Path(__file__).resolve().parents[2] / "cmoe"
PACKAGE = "cmoe"
OUTSIDE_THE_CORE = ("cmoe.plugins", "cmoe.kernels", "cmoe.reference_models", "cmoe.benchmarks")
REGISTRY_MAY_IMPORT = {"cmoe.errors"}


@dataclass(frozen=True)
class Import:
    source: str  # the importing module, e.g. cmoe.registry
    target: str  # the module imported, e.g. cmoe.plugin_manager (a package's name for its __init__)
    file: str  # cmoe/registry.py
    line: int
    lazy: bool  # inside a function
    comment: bool  # a comment on its line or on the line above

    def where(self) -> str:
        return f"{self.file}:{self.line} imports {self.target}"


def module_name(path: Path) -> str:
    parts = path.relative_to(CORE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def core_files() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(CORE.rglob("*.py")) if "__pycache__" not in path.parts}


MODULES = core_files()


def _resolve_relative(source: str, is_package: bool, level: int, module: str | None) -> str:
    base = source.split(".")
    base = base if is_package else base[:-1]
    base = base[:len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def _targets(node: ast.Import | ast.ImportFrom, source: str, is_package: bool) -> list[str]:
    """The modules an import statement loads that matter here: ``from cmoe import auto`` is ``cmoe.auto`` when
    that is a module, else the package ``cmoe``; ``from cmoe.x import y`` is ``cmoe.x`` (and ``cmoe.x.y`` if a
    module)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = _resolve_relative(source, is_package, node.level, node.module) if node.level else node.module or ""
    found = []
    for alias in node.names:
        sub = f"{base}.{alias.name}"
        if sub in MODULES or any(sub == p or sub.startswith(p + ".") for p in OUTSIDE_THE_CORE):
            found.append(sub)
        elif base not in found:
            found.append(base)
    return found


def _function_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            for inner in ast.walk(node):
                if isinstance(inner, (ast.Import, ast.ImportFrom)):
                    lines.add(inner.lineno)
    return lines


def imports_of(name: str, path: Path) -> list[Import]:
    text = path.read_text()
    source_lines = text.splitlines()
    tree = ast.parse(text, filename=str(path))
    lazy_lines = _function_lines(tree)
    file = path.relative_to(CORE.parent).as_posix()
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)) or getattr(node, "module", None) == "__future__":
            continue
        own = source_lines[node.lineno - 1:node.end_lineno]
        above = source_lines[node.lineno - 2] if node.lineno > 1 else ""
        comment = any("#" in line for line in own) or above.strip().startswith("#")
        for target in _targets(node, name, path.name == "__init__.py"):
            found.append(Import(name, target, file, node.lineno, node.lineno in lazy_lines, comment))
    return found


ALL = [imp for name, path in MODULES.items() for imp in imports_of(name, path)]


def _is_cmoe(target: str) -> bool:
    return target == PACKAGE or target.startswith(PACKAGE + ".")


def _core_target(target: str) -> str | None:
    """The core module `target` loads, if any (``cmoe.x.y`` with no such module: its package ``cmoe.x``)."""
    while target:
        if target in MODULES:
            return target
        target = target.rpartition(".")[0]
    return None


def find_cycle(edges: dict[str, list[Import]]) -> list[Import] | None:
    """One cycle of the import graph as its edges, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[Import] = []

    def visit(node: str) -> list[Import] | None:
        state[node] = 1
        for edge in edges.get(node, []):
            if state.get(edge.target) == 1:
                start = next(i for i, e in enumerate(path + [edge]) if e.source == edge.target)
                return (path + [edge])[start:]
            if edge.target not in state:
                path.append(edge)
                cycle = visit(edge.target)
                if cycle:
                    return cycle
                path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_core_is_found() -> None:
    assert {"cmoe", "cmoe.registry", "cmoe.plugin_manager", "cmoe.dispatch", "cmoe.auto"} <= set(MODULES)


def test_no_import_circle_between_core_modules() -> None:
    edges: dict[str, list[Import]] = {}
    for imp in ALL:
        target = _core_target(imp.target)
        if target and PACKAGE not in (imp.source, target) and target != imp.source:
            edges.setdefault(imp.source, []).append(Import(imp.source, target, imp.file, imp.line, imp.lazy,
                                                           imp.comment))
    cycle = find_cycle(edges)
    if cycle:
        pytest.fail("import circle in the core: " + " -> ".join(
            f"{e.where()}{' (inside a function)' if e.lazy else ''}" for e in cycle), pytrace=False)


def test_the_registry_is_a_leaf() -> None:
    bad = [imp.where() for imp in ALL if imp.source == "cmoe.registry" and _is_cmoe(imp.target)
           and imp.target not in REGISTRY_MAY_IMPORT]
    assert not bad, ("cmoe/registry.py may import no cmoe module but cmoe.errors (the plugin manager installs its "
                     "loader, `set_loader`; types are checked by who declares them): " + "; ".join(bad))


def test_no_core_module_imports_the_package_itself() -> None:
    bad = [imp.where() for imp in ALL if imp.source != PACKAGE and imp.target == PACKAGE]
    assert not bad, ("cmoe/__init__.py imports every core module, so a core module importing `cmoe` points up; "
                     "import the module that defines the name: " + "; ".join(bad))


def test_the_core_imports_nothing_outside_it() -> None:
    bad = [imp.where() for imp in ALL
           if any(imp.target == p or imp.target.startswith(p + ".") for p in OUTSIDE_THE_CORE)]
    assert not bad, ("the core must not import plugins, kernels, reference models or benchmarks (name them in "
                     "entry points): " + "; ".join(bad))


def test_lazy_imports_are_for_start_up_time_only() -> None:
    circles = [imp.where() for imp in ALL if imp.lazy and _is_cmoe(imp.target)]
    assert not circles, ("an import of a cmoe module inside a function can only hide a circle (the package imports "
                         "its modules on start); move it to the top: " + "; ".join(circles))
    silent = [imp.where() for imp in ALL if imp.lazy and not imp.comment]
    assert not silent, ("an import inside a function needs a comment saying why it is lazy (start-up time): "
                        + "; ".join(silent))
