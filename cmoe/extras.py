"""Optional dependencies: one clear line, instead of an ImportError from deep inside, when one is missing or too old.

The extras and their version ranges are read from this installed cmoe's own metadata (pyproject.toml's
``[project.optional-dependencies]``), so the check and the declared ranges never disagree. `require` is called
where a feature that needs an extra starts: the ``cmoe unimed`` command, the Hugging Face builders, LoRA.
"""

from __future__ import annotations

import functools
import importlib.metadata as metadata

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from cmoe.errors import CMoEError

DISTRIBUTION = "cmoe"


@functools.cache
def _declared() -> tuple[Requirement, ...]:
    try:
        return tuple(Requirement(line) for line in metadata.requires(DISTRIBUTION) or ())
    except metadata.PackageNotFoundError:  # running from a source tree that was never installed
        return ()


def requirements_of(extra: str) -> list[Requirement]:
    """The requirements `extra` brings on this platform, nested extras (``cmoe[hf]``) expanded."""
    found: list[Requirement] = []
    environment = default_environment()
    for requirement in _declared():
        if requirement.marker is None or not requirement.marker.evaluate({**environment, "extra": extra}):
            continue
        if requirement.marker.evaluate({**environment, "extra": ""}):  # not tied to this extra (a core dependency)
            continue
        if canonicalize_name(requirement.name) == DISTRIBUTION:
            for nested in sorted(requirement.extras):
                found.extend(requirements_of(nested))
        elif requirement not in found:
            found.append(requirement)
    return found


def problems(extra: str) -> list[str]:
    """What is missing or outside the declared range among `extra`'s requirements, one phrase each."""
    found = []
    for requirement in requirements_of(extra):
        try:
            version = metadata.version(requirement.name)
        except metadata.PackageNotFoundError:
            found.append(f"{requirement.name} is not installed")
            continue
        if requirement.specifier and not requirement.specifier.contains(version, prereleases=True):
            found.append(f"{requirement.name} {version} is installed but {requirement.name}{requirement.specifier} "
                         "is needed")
    return found


_satisfied: set[str] = set()


def require(extra: str, feature: str) -> None:
    """Raise one `CMoEError` naming every missing or mismatched package of `extra` and the install command."""
    if extra in _satisfied:
        return
    found = problems(extra)
    if found:
        raise CMoEError(f"{feature} needs cmoe[{extra}]: {'; '.join(found)}. Install it with "
                        f"pip install 'cmoe[{extra}]' (from a clone: pip install -e '.[{extra}]')")
    _satisfied.add(extra)
