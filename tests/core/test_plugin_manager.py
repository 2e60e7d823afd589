"""The plugin contract: built-ins through hooks, runtime and entry-point plugins, and their errors."""

from __future__ import annotations

import importlib.metadata
import sys
import types

import pytest
import torch

import cmoe
from cmoe import CMoEConfig, CMoEConnector, PluginError, hookimpl
from cmoe.plugin_manager import PluginSource, reset_plugins
from cmoe.routers import Router

pytestmark = pytest.mark.smoke  # in the newest-versions stage (.ci/latest)


@pytest.fixture(autouse=True)
def _fresh_plugins():
    reset_plugins()
    yield
    reset_plugins()


class EveryOtherRouter(Router):
    """A toy custom router: token gate, softmax, top-1."""

    name = "every_other"
    default_top_k = 1


class RouterPlugin:
    @hookimpl
    def cmoe_register_routers(self, register):
        register("every_other", EveryOtherRouter)


def fake_entry_points(monkeypatch, *sources: PluginSource) -> None:
    monkeypatch.setattr("cmoe.plugin_manager.iter_entry_points", lambda: iter(sources))


def source(name: str, value: str, dist: str = "cmoe-fake-plugin") -> PluginSource:
    return PluginSource(importlib.metadata.EntryPoint(name, value, "cmoe"), dist, "1.2.3")


def test_builtins_come_through_the_hooks_with_their_origin() -> None:
    rows = cmoe.list_plugins()
    assert ("router", "token_topk", "cmoe (built-in)") in rows
    assert ("expert", "mlp", "cmoe (built-in)") in rows
    assert ("backend", "sorted", "cmoe (built-in)") in rows
    assert "cmoe.core_plugin" in dict(cmoe.get_plugin_manager().list_name_plugin())


def test_runtime_plugin_router_trains_inside_a_connector_by_name() -> None:
    cmoe.register_plugin(RouterPlugin(), name="toy")
    assert cmoe.ROUTERS.origin("every_other") == "toy"
    model = CMoEConnector(CMoEConfig(in_features=4, out_features=3, num_experts=3, router="every_other"))
    assert isinstance(model.router, EveryOtherRouter) and model.router.top_k == 1
    optim = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 2, 4), torch.randn(8, 2, 3)
    losses = []
    for _ in range(20):
        loss = torch.nn.functional.mse_loss(model(x).hidden_states, y)
        optim.zero_grad()
        loss.backward()
        optim.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    cmoe.unregister_plugin("toy")
    with pytest.raises(cmoe.UnknownNameError, match="unknown router 'every_other'"):
        cmoe.get_router("every_other")


def test_duplicate_name_names_both_origins() -> None:
    class Clash:
        @hookimpl
        def cmoe_register_routers(self, register):
            register("soft", EveryOtherRouter)

    with pytest.raises(PluginError, match=r"router 'soft' is registered twice: by cmoe \(built-in\) and by clash"):
        cmoe.register_plugin(Clash(), name="clash")


def test_wrong_type_is_rejected_with_the_expected_type() -> None:
    class Wrong:
        @hookimpl
        def cmoe_register_experts(self, register):
            register("conv", torch.nn.Conv1d)

    with pytest.raises(PluginError, match=r"expert 'conv' from wrong: expected a cmoe.StackedExperts subclass"):
        cmoe.register_plugin(Wrong(), name="wrong")


def test_misspelled_hook_is_caught() -> None:
    class Typo:
        @hookimpl
        def cmoe_register_router(self, register):
            register("x", EveryOtherRouter)

    with pytest.raises(PluginError, match="plugin typo is not a valid cmoe plugin.*cmoe_register_router"):
        cmoe.register_plugin(Typo(), name="typo")
    assert "typo" not in dict(cmoe.get_plugin_manager().list_name_plugin())


def test_failing_hook_names_the_plugin() -> None:
    class Crash:
        @hookimpl
        def cmoe_register_llms(self, register):
            raise RuntimeError("boom")

    with pytest.raises(PluginError, match="plugin crash: cmoe_register_llms failed: RuntimeError: boom"):
        cmoe.register_plugin(Crash(), name="crash")


def test_entry_point_that_fails_to_import_names_distribution_and_entry_point(monkeypatch) -> None:
    fake_entry_points(monkeypatch, source("broken", "cmoe_no_such_module_xyz"))
    with pytest.raises(PluginError, match=r"failed to import: entry point 'broken' = 'cmoe_no_such_module_xyz' "
                                          r"of distribution cmoe-fake-plugin 1\.2\.3: ModuleNotFoundError"):
        cmoe.get_router("soft")
    monkeypatch.setenv("CMOE_DISABLE_PLUGINS", "broken")
    assert cmoe.get_router("soft").name == "soft"


def test_entry_point_plugin_registers_with_its_distribution(monkeypatch) -> None:
    module = types.ModuleType("cmoe_fake_plugin_mod")
    module.cmoe_register_routers = RouterPlugin().cmoe_register_routers
    monkeypatch.setitem(sys.modules, "cmoe_fake_plugin_mod", module)
    fake_entry_points(monkeypatch, source("fake", "cmoe_fake_plugin_mod"))
    assert cmoe.ROUTERS.origin("every_other") == "fake (cmoe-fake-plugin 1.2.3)"
    assert ("router", "every_other", "fake (cmoe-fake-plugin 1.2.3)") in cmoe.list_plugins()


def test_entry_point_with_wrong_type_names_its_distribution(monkeypatch) -> None:
    module = types.ModuleType("cmoe_fake_wrong_mod")

    @hookimpl
    def cmoe_register_backends(register):
        register("fast", lambda *a: None)

    module.cmoe_register_backends = cmoe_register_backends
    monkeypatch.setitem(sys.modules, "cmoe_fake_wrong_mod", module)
    fake_entry_points(monkeypatch, source("wrongtype", "cmoe_fake_wrong_mod", dist="cmoe-wrong"))
    with pytest.raises(PluginError, match=r"backend 'fast' from wrongtype \(cmoe-wrong 1\.2\.3\): expected a cmoe.Backend"):
        cmoe.BACKENDS.names()
    monkeypatch.setenv("CMOE_DISABLE_PLUGINS", "wrongtype")
    assert "sorted" in cmoe.BACKENDS.names()
