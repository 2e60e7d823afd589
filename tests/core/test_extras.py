"""A missing or mismatched optional dependency gives one line naming the package and the install command,
read from the ranges this installed cmoe declares (the wheel test checks it in a venv without the extras)."""

from __future__ import annotations

import importlib.metadata as metadata

import pytest

from cmoe import CMoEError, extras


@pytest.fixture
def installed(monkeypatch: pytest.MonkeyPatch):
    """Pretend versions: a dict of distribution -> version (None: not installed); others as they really are."""
    fake: dict[str, str | None] = {}
    real = metadata.version

    def version(name: str) -> str:
        if name in fake:
            if fake[name] is None:
                raise metadata.PackageNotFoundError(name)
            return fake[name]
        return real(name)

    monkeypatch.setattr(extras.metadata, "version", version)
    monkeypatch.setattr(extras, "_satisfied", set())
    return fake


def test_the_extras_are_read_from_the_installed_metadata() -> None:
    names = lambda extra: {r.name for r in extras.requirements_of(extra)}  # noqa: E731
    assert names("hf") == {"transformers", "peft"}
    assert {"transformers", "peft", "pyyaml", "nltk", "rouge-score", "pycocoevalcap"} <= names("unimed")
    assert names("dev") >= names("unimed") | {"pytest", "kernels"}
    assert extras.requirements_of("no-such-extra") == []
    for extra in ("hf", "unimed", "dev"):
        assert extras.problems(extra) == [], "this environment is the locked one: nothing may be missing"


def test_a_missing_package_names_itself_and_the_command(installed) -> None:
    installed["peft"] = None
    with pytest.raises(CMoEError) as caught:
        extras.require("hf", "LoRA")
    assert str(caught.value) == ("LoRA needs cmoe[hf]: peft is not installed. Install it with pip install "
                                 "'cmoe[hf]' (from a clone: pip install -e '.[hf]')")


def test_a_too_old_version_names_the_range_and_nested_extras_count(installed) -> None:
    installed["transformers"] = "4.0.0"
    installed["pyyaml"] = None
    message = str(pytest.raises(CMoEError, extras.require, "unimed", "cmoe unimed").value)
    floor = next(r for r in extras.requirements_of("hf") if r.name == "transformers").specifier
    assert f"transformers 4.0.0 is installed but transformers{floor} is needed" in message
    assert "pyyaml is not installed" in message and "pip install 'cmoe[unimed]'" in message
    assert "\n" not in message


def test_the_builders_check_before_importing(installed) -> None:
    from cmoe.plugins.llms import build_hf_causal_lm
    from cmoe.plugins.tiny import tiny_llava

    installed["transformers"] = None
    for build in (tiny_llava, lambda: build_hf_causal_lm(config={"model_type": "llama"})):
        with pytest.raises(CMoEError, match=r"needs cmoe\[hf\]: transformers is not installed"):
            build()
