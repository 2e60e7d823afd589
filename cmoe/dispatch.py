"""Token → expert dispatch: ``moe_project`` and its table of interchangeable backends.

Every backend computes the same thing, ``y[t] = Σ_j w[t, j] · Expert_{i[t, j]}(x[t])``, and is
differentiable with respect to ``x``, the expert weights and the routing weights ``w``:

* ``loop`` — the reference: one expert and one slot at a time, obviously correct, slow;
* ``sorted`` — (token, slot) pairs sorted by expert once, then one expert at a time: gather, its layers,
  weighted scatter-add back to token order (a per-expert cuBLAS/MKL matmul loop); the table rule's choice
  for sparse routing;
* ``dense`` — every expert on every token as one wide GEMM, weighted by the dense ``[T, E]`` mixing matrix:
  what the original Uni-Med computes; the table rule's choice for dense routing on CUDA, where it measures
  faster than ``sorted`` (benchmarks/RESULTS.md, the "under dense routing" line); on CPU ``sorted`` measures
  faster even there (benchmarks/RESULTS-cpu.md);
* ``triton`` — fused GPU kernels (`cmoe.kernels`), registered by the ``triton_kernels`` plugin entry point;
  a candidate of the measuring ``auto`` on CUDA only (never the CPU interpreter);
* ``grouped_mm`` — one ``torch.nn.functional.grouped_mm`` per layer over expert-sorted rows, offsets on the
  device (`cmoe.kernels.grouped_mm`), registered by the same entry point.

``auto`` times the candidates on the first call of each shape class and keeps the fastest (`cmoe.auto`);
``CMOE_AUTO=table`` restores the hand-written rule of `table_backend`.

Backends are registered through the ``cmoe_register_backends`` plugin hook (see `cmoe.core_plugin`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cmoe import auto
from cmoe.errors import CMoEError, UnknownNameError, expect, expect_ids_below
from cmoe.experts import StackedExperts
from cmoe.registry import BACKENDS

BackendFn = Callable[[torch.Tensor, StackedExperts, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Backend:
    """A dispatch implementation and the question of whether it can run on a device."""

    name: str
    fn: BackendFn
    is_available: Callable[[torch.device], bool] = lambda device: True
    description: str = ""
    unavailable_reason: Callable[[torch.device], str | None] = lambda device: None
    # None when the backend can run these inputs (dtype, widths, tracing), else why not: `auto` skips it then.
    input_problem: Callable[[torch.Tensor, StackedExperts], str | None] = lambda x, experts: None
    # Whether the measuring `auto` may time (and pick) it on a device (``loop``: never; ``triton``: CUDA only).
    auto_candidate: Callable[[torch.device], bool] = lambda device: True


_KERNELS_PLUGIN = ("reinstall cmoe so its `triton_kernels` entry point (cmoe.kernels.plugin) is registered, and "
                   "check CMOE_DISABLE_PLUGINS does not name it")
_PROVIDED_ELSEWHERE = {"triton": _KERNELS_PLUGIN, "grouped_mm": _KERNELS_PLUGIN}


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype partial sums use: float32 for half types, the input's own for float32/float64."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def loop_backend(x: torch.Tensor, experts: StackedExperts, index: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Reference: for every expert and slot, select its tokens, project them, add them weighted."""
    out = x.new_zeros(x.shape[0], experts.out_features, dtype=accumulate_dtype(x.dtype))
    for expert in range(experts.num_experts):
        for slot in range(index.shape[1]):
            rows = torch.nonzero(index[:, slot] == expert).squeeze(1)
            if rows.numel() == 0:
                continue
            y = experts.forward_expert(expert, x.index_select(0, rows))
            out = out.index_add(0, rows, (y * weight[rows, slot, None]).to(out.dtype))
    return out.to(x.dtype)


def sorted_backend(x: torch.Tensor, experts: StackedExperts, index: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Sort (token, slot) pairs by expert once, then per expert: gather its rows, run its whole chain of
    layers, scale by the routing weights and scatter-add into the output.

    Depth-first per expert keeps each expert's intermediates small enough to stay in cache. The stacked
    weights are unbound once, so backward assembles one ``[E, out, in]`` gradient from the per-expert
    pieces (indexing ``W[e]`` instead would allocate a full-size zero gradient per expert).
    """
    num_tokens, top_k = index.shape
    flat = index.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=experts.num_experts).tolist()
    token_of = order // top_k
    slot_weight = weight.reshape(-1)[order]
    layers = [(w.unbind(0), None if b is None else b.unbind(0)) for w, b in experts.layers]
    acc = accumulate_dtype(x.dtype)
    out = x.new_zeros(num_tokens, experts.out_features, dtype=acc)
    start = 0
    for expert, count in enumerate(counts):
        if not count:
            continue
        rows = token_of[start:start + count]
        hidden = x.index_select(0, rows)
        for depth, (weights, biases) in enumerate(layers):
            hidden = F.linear(hidden, weights[expert], None if biases is None else biases[expert])
            if depth < len(layers) - 1:
                hidden = experts.activation(hidden)
        out.index_add_(0, rows, hidden.to(acc) * slot_weight[start:start + count, None].to(acc))
        start += count
    return out.to(x.dtype)


def dense_backend(x: torch.Tensor, experts: StackedExperts, index: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Every expert on every token: the first layer is one ``[T, in] × [in, E·out]`` GEMM, later layers one bmm."""
    num_tokens = x.shape[0]
    num_experts = experts.num_experts
    mixing = weight.new_zeros(num_tokens, num_experts).scatter_add(1, index, weight)
    layers = experts.layers
    w0, b0 = layers[0]
    hidden = F.linear(x, w0.reshape(-1, w0.shape[-1]), None if b0 is None else b0.reshape(-1))
    hidden = hidden.view(num_tokens, num_experts, w0.shape[1])
    for w, b in layers[1:]:
        hidden = torch.einsum("teh,eoh->teo", experts.activation(hidden), w)
        if b is not None:
            hidden = hidden + b
    acc = accumulate_dtype(x.dtype)
    return torch.einsum("teo,te->to", hidden.to(acc), mixing.to(acc)).to(x.dtype)


def _check_inputs(x: torch.Tensor, experts: StackedExperts, index: torch.Tensor, weight: torch.Tensor) -> None:
    expect(isinstance(experts, StackedExperts), "experts", "a cmoe StackedExperts module (stacked [E, out, in] "
           "weights)", type(experts).__name__)
    expect(x.is_floating_point(), "x", "a floating-point tensor", x.dtype)
    expect(x.dim() >= 1 and x.shape[-1] == experts.in_features, "x",
           f"a [..., {experts.in_features}] tensor (the experts' in_features)",
           lambda: f"shape {list(x.shape)}")
    expect(not index.is_floating_point() and index.dtype != torch.bool, "expert_index", "an integer tensor",
           index.dtype)
    expect(index.dim() == x.dim() and index.shape[:-1] == x.shape[:-1], "expert_index",
           lambda: f"shape [{', '.join(map(str, x.shape[:-1]))}, k] matching x",
           lambda: f"shape {list(index.shape)}")
    expect(1 <= index.shape[-1] <= experts.num_experts, "expert_index",
           f"k in 1..num_experts={experts.num_experts} columns", index.shape[-1])
    expect(weight.shape == index.shape, "expert_weight", lambda: f"shape {list(index.shape)} like expert_index",
           lambda: f"shape {list(weight.shape)}")
    expect(weight.is_floating_point(), "expert_weight", "a floating-point tensor", weight.dtype)
    expect(index.device == x.device and weight.device == x.device, "expert_index/expert_weight",
           f"tensors on x's device {x.device}", f"{index.device} and {weight.device}")
    if x.device.type == "cpu":
        expect_ids_below(index, experts.num_experts, "expert_index", f"values in 0..{experts.num_experts - 1}")


def check_backend_name(backend: str) -> None:
    """Raise a clear error unless `backend` is ``auto`` or a registered backend's name."""
    if backend == "auto" or backend in BACKENDS:
        return
    if backend in _PROVIDED_ELSEWHERE:
        raise CMoEError(f"backend {backend!r} is not loaded: {_PROVIDED_ELSEWHERE[backend]}")
    raise UnknownNameError("backend", backend, [*BACKENDS.names(), "auto"])


def table_backend(device: torch.device, num_experts: int, top_k: int) -> str:
    """The hand-written rule (``CMOE_AUTO=table``, and while ``torch.compile`` traces an unmeasured class).

    From benchmarks/RESULTS.md: on CUDA ``dense`` under dense routing (k = E) and ``sorted`` otherwise; on CPU,
    ``sorted``, except while ``torch.compile`` traces dense routing: ``sorted`` sizes its slices on the host and
    would break the graph, ``dense`` compiles whole.
    """
    if top_k == num_experts and (device.type == "cuda" or torch.compiler.is_compiling()):
        return "dense"
    return "sorted"


def select_backend(x: torch.Tensor, num_experts: int, top_k: int, backend: str = "auto") -> str:
    """The named backend after checking it can run on `x`'s device; for ``auto``, the table rule's answer
    (`table_backend`): the shape-only part of the choice. `moe_project`'s ``auto`` measures (`cmoe.auto`)."""
    check_backend_name(backend)
    if backend != "auto":
        chosen = BACKENDS.get(backend)
        if not chosen.is_available(x.device):
            reason = chosen.unavailable_reason(x.device)
            raise CMoEError(f"backend {backend!r} cannot run on device {x.device}"
                            + (f": {reason}" if reason else "") + "; use backend='auto' or one of "
                            f"{[n for n in BACKENDS.names() if BACKENDS.get(n).is_available(x.device)]}")
        return backend
    return table_backend(x.device, num_experts, top_k)


def moe_project(
    x: torch.Tensor,
    experts: StackedExperts,
    expert_index: torch.Tensor,
    expert_weight: torch.Tensor,
    backend: str = "auto",
) -> torch.Tensor:
    """Project tokens through their routed experts and mix: ``x [..., in]`` → ``[..., out]``.

    ``expert_index`` / ``expert_weight`` are ``[..., k]`` (the leading dims of ``x``). ``backend`` is a name
    from `BACKENDS` or ``auto``: the fastest candidate measured for this shape class (`cmoe.auto`).
    """
    _check_inputs(x, experts, expert_index, expert_weight)
    lead = x.shape[:-1]
    k = expert_index.shape[-1]
    name = select_backend(x, experts.num_experts, k, backend)
    flat_x = x.reshape(-1, x.shape[-1])
    if flat_x.shape[0] == 0:
        return x.new_zeros(*lead, experts.out_features)
    flat_index, flat_weight = expert_index.reshape(-1, k).long(), expert_weight.reshape(-1, k).to(x.dtype)
    if backend == "auto":
        name = auto.selector().choose(flat_x, experts, flat_index, flat_weight, fallback=name).backend
    else:
        problem = BACKENDS.get(name).input_problem(flat_x, experts)
        if problem is not None:
            raise CMoEError(f"backend {name!r} cannot run these inputs: {problem}; use backend='auto' or 'sorted'")
    out = BACKENDS.get(name).fn(flat_x, experts, flat_index, flat_weight)
    return out.reshape(*lead, experts.out_features)
