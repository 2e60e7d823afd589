"""The repository's top-level source folders, and what a bare import of their names does.

`kernels/`, `plugins/`, `reference_models/` and `benchmarks/` hold the sources of `cmoe.kernels`,
`cmoe.plugins`, `cmoe.reference_models` and `cmoe.benchmarks` (pyproject.toml maps them). Python puts the
current directory first on ``sys.path`` for ``python -m ...``, ``torchrun -m ...`` and ``pytest``, so from the
repository root a bare ``import kernels`` finds our folder before Hugging Face's ``kernels`` distribution (a
transformers dependency), and ``import benchmarks`` before PyPI's ``benchmarks``. Each folder's ``__init__``
therefore starts with a guard: imported under any name but its ``cmoe.*`` one, it runs `hand_over`, which
loads the next module of that name on ``sys.path`` outside the repository in its place, or raises
``ModuleNotFoundError`` as if the folder were not there. A bare name never resolves to our code.

This file uses the standard library only: the guards load it by path (``runpy.run_path``), without importing
the ``cmoe`` package (which imports torch and may import transformers, the very importer of ``kernels``).
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys

# bare folder name -> the only name it may be imported as
SOURCE_FOLDERS: dict[str, str] = {
    "kernels": "cmoe.kernels",
    "plugins": "cmoe.plugins",
    "reference_models": "cmoe.reference_models",
    "benchmarks": "cmoe.benchmarks",
}
REPOSITORY = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))


def _outside_repository(entry: str) -> bool:
    return os.path.realpath(entry or os.curdir) != REPOSITORY


def hand_over(name: str) -> None:
    """Put the next module called `name` on ``sys.path`` (outside this repository) in ``sys.modules``.

    Called by a source folder's ``__init__`` while Python imports it as the bare `name`; the import
    machinery then returns whatever ``sys.modules[name]`` holds when the ``__init__`` finishes.
    """
    path = [entry for entry in sys.path if isinstance(entry, str) and _outside_repository(entry)]
    spec = importlib.machinery.PathFinder.find_spec(name, path)
    if spec is None:
        raise ModuleNotFoundError(
            f"No module named {name!r}: the repository's {name}/ folder is the source of "
            f"{SOURCE_FOLDERS.get(name, 'cmoe.' + name)!r}, not a top-level package", name=name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # before it runs, so that its own `from name import ...` finds it
    if spec.loader is not None:  # None: a namespace package, nothing to run
        spec.loader.exec_module(module)
