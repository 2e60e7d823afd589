"""No host sync in a connector step, checked on CPU: the ops that make a CUDA stream wait for the host are
recorded with a `TorchDispatchMode` and must not appear in a warmed-up step of the sync-free backends.

The GPU module (`test_triton_gpu.py`) checks the same with ``torch.cuda.set_sync_debug_mode("error")`` and a
CUDA-graph capture; this test runs in CI, where there is no GPU, so a sync slipped into the router, the aux
losses, the alignment or the fused backward is caught before a GPU session sees it. Reading tensors back to
Python lists (``tolist``) does not pass through the dispatcher, so it is trapped by patching that method.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import cmoe

# Ops whose CUDA kernels copy a value to the host (or size their output from one).
SYNCING_OPS = {"_local_scalar_dense", "item", "nonzero", "bincount", "_unique2", "unique_dim",
               "unique_consecutive", "masked_select", "is_nonzero", "equal", "allclose"}


# The id range check reads values back by design and runs on CPU tensors only (see its docstring).
CPU_ONLY_CHECK = "expect_ids_below"


def _inside_cpu_only_check() -> bool:
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_name == CPU_ONLY_CHECK and frame.f_globals.get("__name__") == "cmoe.errors":
            return True
        frame = frame.f_back
    return False


class SyncRecorder(TorchDispatchMode):
    """Records every dispatched op that would sync a CUDA stream with the host (outside `CPU_ONLY_CHECK`)."""

    def __init__(self) -> None:
        super().__init__()
        self.syncs: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if _inside_cpu_only_check():
            pass
        elif name in SYNCING_OPS:
            self.syncs.append(str(func))
        elif name == "repeat_interleave" and kwargs.get("output_size") is None:
            self.syncs.append(str(func))
        elif name in ("index", "index_put", "index_put_") and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or ()) if i is not None):
            self.syncs.append(f"{func} with a boolean mask")
        return func(*args, **kwargs)


def _record_step(connector: cmoe.CMoEConnector, x: torch.Tensor, task_ids: torch.Tensor | None,
                 monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The ops of one forward + aux loss + backward that would sync, after one warm-up step."""

    def step() -> None:
        out = connector(x, task_ids=task_ids)
        loss = out.hidden_states.float().square().mean() + out.aux_loss
        loss.backward()

    step()
    calls: list[str] = []
    original = torch.Tensor.tolist

    def traced_tolist(self):
        calls.append("Tensor.tolist")
        return original(self)

    monkeypatch.setattr(torch.Tensor, "tolist", traced_tolist)
    with SyncRecorder() as recorder:
        step()
    monkeypatch.setattr(torch.Tensor, "tolist", original)
    return recorder.syncs + calls


def _connector(**overrides) -> cmoe.CMoEConnector:
    options = dict(in_features=12, out_features=10, num_experts=4, top_k=2, check_finite=False,
                   load_balance_coef=0.01, z_loss_coef=0.001)
    options.update(overrides)
    return cmoe.CMoEConnector(cmoe.CMoEConfig(**options))


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs triton's CPU interpreter")
@pytest.mark.parametrize("expert", ["linear", "mlp"])
def test_triton_step_has_no_host_sync(expert: str, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("triton")
    connector = _connector(backend="triton", expert=expert)
    syncs = _record_step(connector, torch.randn(2, 20, 12), None, monkeypatch)
    assert syncs == [], f"the triton step would sync the host on a GPU: {syncs}"


@pytest.mark.parametrize("router, options", [
    ("soft", {"top_k": None}),
    ("task", {"top_k": None, "num_tasks": 3}),
    ("task_token", {"top_k": None, "num_tasks": 3, "router_rule": "sigmoid"}),
])
def test_dense_step_has_no_host_sync(router: str, options: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    connector = _connector(backend="dense", router=router, **options)
    task_ids = torch.tensor([0, 2]) if "num_tasks" in options else None
    syncs = _record_step(connector, torch.randn(2, 20, 12), task_ids, monkeypatch)
    assert syncs == [], f"the dense step would sync the host on a GPU: {syncs}"


def test_the_recorder_sees_the_sorted_backends_syncs(monkeypatch: pytest.MonkeyPatch) -> None:
    """`sorted` sizes its per-expert slices on the host, so the recorder must report it (the check can fail)."""
    syncs = _record_step(_connector(backend="sorted"), torch.randn(2, 20, 12), None, monkeypatch)
    assert syncs, "the sorted backend reads expert counts on the host; the recorder saw nothing"


def test_check_finite_is_reported_as_a_sync(monkeypatch: pytest.MonkeyPatch) -> None:
    """The router's finite check reads a bool back: why the GPU test and graph capture turn it off."""
    syncs = _record_step(_connector(backend="dense", check_finite=True, router="soft", top_k=None),
                         torch.randn(2, 20, 12), None, monkeypatch)
    assert any("_local_scalar_dense" in s or "is_nonzero" in s for s in syncs), syncs
