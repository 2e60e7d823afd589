"""Audit: hostile or broken plugin packages (real distributions on ``sys.path``) and the command line. A broken
plugin must be reported as one `PluginError` naming its package and the fix; the CLI prints errors and Ctrl-C
as one line, never a traceback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from robustness_audit import assert_clear

from cmoe import PluginError, cli
from cmoe.plugin_manager import list_plugins, load_plugins, reset_plugins
from cmoe.registry import get_router, get_vision_encoder

ROUTER = textwrap.dedent("""
    import sys
    import cmoe
    class Mine(cmoe.Router):
        name = "{router}"
    @cmoe.hookimpl
    def cmoe_register_routers(register):
        {body}
""")


def make_distribution(site: Path, dist: str, entry: str, module: str, source: str) -> None:
    """A real installed distribution: ``<dist>-1.0.dist-info`` with a ``cmoe`` entry point, and its module."""
    info = site / f"{dist.replace('-', '_')}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[cmoe]\n{entry} = {module}\n")
    (site / f"{module}.py").write_text(source)


@pytest.fixture
def site(tmp_path, monkeypatch):
    reset_plugins()
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in [m for m in sys.modules if m.startswith("audit_plugin")]:
        del sys.modules[name]
    reset_plugins()


def _router_plugin(site: Path, dist: str, entry: str, module: str, router: str, body: str | None = None) -> None:
    make_distribution(site, dist, entry, module,
                      ROUTER.format(router=router, body=body or f"register({router!r}, Mine)"))


def test_another_packages_entry_point_with_cmoes_name_does_not_replace_cmoes_plugins(site) -> None:
    _router_plugin(site, "evil-pkg", "builtin_plugins", "audit_plugin_evil", "evil_router")
    load_plugins()
    assert get_vision_encoder("hf_clip") is not None and get_router("evil_router") is not None
    origins = {name: origin for kind, name, origin in list_plugins()}
    assert "evil-pkg" in origins["evil_router"] and "evil-pkg" not in origins["hf_clip"]


def test_two_packages_registering_the_same_router_name_both_are_named(site) -> None:
    _router_plugin(site, "pkg-one", "one", "audit_plugin_one", "twin")
    _router_plugin(site, "pkg-two", "two", "audit_plugin_two", "twin")
    with pytest.raises(PluginError) as error:
        load_plugins()
    assert_clear(error.value, "pkg-one", "pkg-two", "twin")


def test_a_package_shadowing_a_builtin_router_name_is_refused(site) -> None:
    _router_plugin(site, "shadow-pkg", "builtin_plugins", "audit_plugin_shadow", "token_topk")
    with pytest.raises(PluginError) as error:
        load_plugins()
    assert_clear(error.value, "shadow-pkg", "token_topk")


def test_the_same_distribution_found_twice_on_sys_path_loads_once(site, tmp_path_factory, monkeypatch) -> None:
    _router_plugin(site, "twice-pkg", "twice", "audit_plugin_twice", "twice_router")
    other = tmp_path_factory.mktemp("copy")
    _router_plugin(other, "twice-pkg", "twice", "audit_plugin_twice", "twice_router")
    monkeypatch.syspath_prepend(str(other))
    load_plugins()
    assert get_router("twice_router") is not None


BROKEN = {
    "sys.exit(0) at import": "import sys\nsys.exit(0)\n",
    "sys.exit(3) at import": "import sys\nsys.exit(3)\n",
    "ImportError at import": "import no_such_module_anywhere\n",
    "RuntimeError at import": "raise RuntimeError('boom')\n",
    "sys.exit in a hook": ROUTER.format(router="x", body="sys.exit(0)"),
    "ValueError in a hook": ROUTER.format(router="x", body="raise ValueError('bad')"),
    "registers a non-router": ROUTER.format(router="x", body="register('x', 42)"),
    "registers an empty name": ROUTER.format(router="x", body="register('', Mine)"),
    "misspelled hook": "import cmoe\n@cmoe.hookimpl\ndef cmoe_register_router(register):\n    pass\n",
}


@pytest.mark.parametrize("kind", list(BROKEN))
def test_a_broken_plugin_is_one_error_naming_its_package(site, kind: str) -> None:
    make_distribution(site, "broken-pkg", "broken", "audit_plugin_broken", BROKEN[kind])
    with pytest.raises(PluginError) as error:
        load_plugins()
    assert_clear(error.value, "broken-pkg" if "hook" not in kind and "registers" not in kind else "broken")


@pytest.mark.parametrize("kind", list(BROKEN))
def test_plugins_list_reports_a_broken_plugin_as_one_line(site, capsys, kind: str) -> None:
    make_distribution(site, "broken-pkg", "broken", "audit_plugin_broken", BROKEN[kind])
    assert cli.main(["plugins", "list"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and captured.err.startswith("error: ")
    assert "broken" in captured.err and "Traceback" not in captured.err


def test_a_disabled_broken_plugin_is_skipped(site, monkeypatch) -> None:
    make_distribution(site, "broken-pkg", "broken", "audit_plugin_broken", BROKEN["sys.exit(0) at import"])
    monkeypatch.setenv("CMOE_DISABLE_PLUGINS", "broken")
    assert get_vision_encoder("hf_clip") is not None


def test_ctrl_c_in_a_command_is_one_line_and_exit_130(site, capsys) -> None:
    make_distribution(site, "cmd-pkg", "cmd", "audit_plugin_cmd", textwrap.dedent("""
        import cmoe
        def interrupted(argv):
            raise KeyboardInterrupt
        @cmoe.hookimpl
        def cmoe_register_commands(register):
            register("audit-interrupt", interrupted)
    """))
    assert cli.main(["audit-interrupt"]) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "interrupted" in err and "Traceback" not in err


CLI_ERRORS = [
    (["unimed", "train", "--config", "/no/such/config.yaml"], "/no/such/config.yaml"),
    (["unimed", "train", "--set", "train.steps=zero"], "train.steps"),
    (["unimed", "train", "--set", "train.progress=maybe"], "train.progress"),
    (["unimed", "train", "--set", "nonsense"], "nonsense"),
    (["unimed", "eval", "--checkpoint", "/no/such/checkpoint"], "/no/such/checkpoint"),
    (["unimed", "train", "--set", "model.connector.options.top_k=99", "--steps", "1"], "top_k"),
]


def _cmoe(args: list[str], cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cmoe", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300, **kwargs)


@pytest.mark.robustness_full
@pytest.mark.parametrize("args,named", CLI_ERRORS, ids=[n for _, n in CLI_ERRORS])
def test_cli_errors_are_one_line_without_traceback(tmp_path, args: list[str], named: str) -> None:
    result = _cmoe(args, tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and named in lines[0], result.stderr[-3000:]


@pytest.mark.robustness_full
def test_a_broken_plugin_package_in_a_real_process_is_one_line(tmp_path) -> None:
    make_distribution(tmp_path, "exit-pkg", "exiter", "audit_plugin_exit", "import sys\nsys.exit(0)\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    result = _cmoe(["plugins", "list"], tmp_path, env=env)
    assert result.returncode == 2 and result.stdout == "" and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and "exit-pkg" in result.stderr


@pytest.mark.robustness_full
def test_sigint_during_training_is_one_line(tmp_path) -> None:
    child = subprocess.Popen([sys.executable, "-m", "cmoe", "unimed", "train", "--output-dir", str(tmp_path / "run"),
                              "--set", "train.steps=100000", "--set", "train.progress=false",
                              "--set", "train.log_every=1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, cwd=tmp_path)
    metrics = tmp_path / "run" / "metrics.jsonl"
    import time

    while not (metrics.is_file() and metrics.read_text().count("\n") >= 1):
        assert child.poll() is None, child.stderr.read()[-3000:]
        time.sleep(0.2)
    os.kill(child.pid, signal.SIGINT)
    _, err = child.communicate(timeout=300)
    assert child.returncode == 130 and "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1].startswith("interrupted")


@pytest.mark.parametrize("args,named", CLI_ERRORS[:4], ids=[n for _, n in CLI_ERRORS[:4]])
def test_cli_config_errors_in_process_are_one_line(tmp_path, capsys, args: list[str], named: str) -> None:
    assert cli.main([*args, "--output-dir", str(tmp_path / "run")]) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and captured.err.startswith("error: ") and named in captured.err
    assert not (tmp_path / "run").exists(), "a rejected config must not create a run directory"
