"""Other projects' MoE kernels, timed side by side with cmoe's backends where they install (optional imports).

Each adapter says which shape it actually runs; where a peer cannot run a case's expert shape it runs the
closest one it supports, and the report's note says so. All of them are CUDA-only: on CPU each is skipped with
the reason. None is needed by cmoe; install them on the GPU machine (``pip install grouped_gemm
sonic-moe liger-kernel``, or carry wheels there with `benchmarks/peer_wheels.sh`) and the runner picks them up.

* ``peer_grouped_gemm`` — MegaBlocks' CUTLASS grouped GEMM (``grouped_gemm.ops.gmm``). The exact case: our
  weights, bias and GELU applied around the GEMMs in torch, routing weights and scatter as ``torch_grouped_mm``.
  Its ``batch_sizes`` argument lives on the host, so every call reads the expert counts back (a sync).
  Checked against cmoe's ``loop`` backend before it is timed.
* ``peer_sonic_moe`` — SonicMoE's ``MoE`` layer (arXiv 2512.14080; package ``sonic-moe``, Hopper/Blackwell).
  Closest shape, not ours: its own softmax-top-k router (an extra ``[T, in] × [in, E]`` GEMM) instead of our
  fixed routing, experts mapping hidden → hidden (so only on the square HF cases), non-gated SiLU instead of
  GELU, no bias, its own random weights. Output not compared with ``loop`` (different routing and activation).
* ``peer_scattermoe`` — ScatterMoE's ``scattermoe.mlp.MLP`` (release 0.3.0, which added biases; not on the
  package index: build a wheel from its repository, see `benchmarks/peer_wheels.sh`). The exact case where
  it has one: two-layer experts whose output width equals the input width (its second layer maps back to the
  input width), with our weights and biases copied in, our activation and routing. Checked against ``loop``.
* ``peer_liger_moe`` — Liger-Kernel's fused MoE (``liger_kernel.ops.fused_moe.LigerFusedMoEFunction``, in
  release 0.8.5): our routing, but SwiGLU experts (a gate+up projection twice as wide: 1.5× our FLOPs), no
  bias, square experts (HF cases only), its own weights.

The adapters of ScatterMoE and Liger run in Triton's CPU interpreter too: ``tests/benchmarks/test_benchmark_peers.py``
checks them against a float64 reference of what each computes, forward and gradients, so an API change in a
peer shows up before GPU time is spent on it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from cmoe.experts import StackedExperts
from cmoe.routers import expert_counts

LIGER_MOE_CANDIDATES = (("liger_kernel.ops.fused_moe", "LigerFusedMoEFunction"),)


@dataclass(frozen=True)
class Peer:
    """One peer: its report name, the shape it runs (for the notes), and how to build its forward callable."""

    name: str
    package: str
    shape_note: str
    exact: bool
    build: Callable[..., Callable[[], torch.Tensor]]
    square_only: bool = False


def _import(module: str) -> object:
    return importlib.import_module(module)


def skip_reason(peer: Peer, device: torch.device, in_features: int, out_features: int, hf: bool) -> str | None:
    """Why `peer` cannot run on this device or case, or None."""
    if device.type != "cuda":
        return f"{peer.package}: CUDA only"
    if peer.square_only and not (hf and in_features == out_features):
        return f"{peer.package}: runs square experts only ({peer.shape_note}); see the HF cases"
    try:
        if peer.name == "peer_liger_moe":
            _liger_moe_class()
        else:
            _import(peer.package.replace("-", "_") if peer.package != "sonic-moe" else "sonicmoe")
    except (ImportError, LookupError) as exc:
        return f"{peer.package} is not installed or lacks the op ({type(exc).__name__}: {exc})"
    return None


def sorted_grouped_layers(x: torch.Tensor, experts: StackedExperts, index: torch.Tensor, weight: torch.Tensor,
                          grouped_matmul: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Our exact computation around someone else's grouped GEMM: sort the (token, expert) pairs by expert, copy
    their rows, ``grouped_matmul(rows, w)`` per layer (``w`` is ``[E, out, in]``, rows in expert order), bias and
    activation, then the weighted ``index_add_`` back to token order."""
    top_k = index.shape[1]
    flat = index.reshape(-1)
    expert_of_row, order = torch.sort(flat, stable=True)
    rows = order // top_k
    hidden = x.index_select(0, rows)
    layers = experts.layers
    for depth, (w, b) in enumerate(layers):
        hidden = grouped_matmul(hidden, w)
        if b is not None:
            hidden = hidden + b.index_select(0, expert_of_row)
        if depth < len(layers) - 1:
            hidden = experts.activation(hidden)
    scaled = hidden * weight.reshape(-1)[order, None]
    return x.new_zeros(x.shape[0], experts.out_features).index_add_(0, rows, scaled)


def grouped_gemm_forward(x: torch.Tensor, experts: StackedExperts, index: torch.Tensor,
                         weight: torch.Tensor) -> torch.Tensor:
    """Our exact computation with MegaBlocks' ``gmm`` for the GEMMs (expert counts read to the host per call)."""
    from grouped_gemm import ops

    batch_sizes = expert_counts(index, experts.num_experts).cpu()
    return sorted_grouped_layers(x, experts, index, weight,
                                 lambda rows, w: ops.gmm(rows, w, batch_sizes, trans_b=True))


def _build_grouped_gemm(x, experts, index, weight, top_k):
    def forward() -> torch.Tensor:
        return grouped_gemm_forward(x, experts, index, weight)
    forward.leaves = [weight, *experts.parameters()]
    return forward


def _build_sonic(x, experts, index, weight, top_k):
    from sonicmoe import MoE
    from sonicmoe.enums import ActivationType

    hidden = experts.widths[1] if len(experts.widths) > 2 else experts.out_features
    module = MoE(num_experts=experts.num_experts, num_experts_per_tok=top_k, hidden_size=experts.in_features,
                 intermediate_size=hidden, activation_function=ActivationType("silu"), add_bias=False,
                 std=0.02).to(device=x.device, dtype=x.dtype)

    def forward() -> torch.Tensor:
        return module(x)[0]
    forward.leaves = list(module.parameters())
    return forward


def scattermoe_module(experts: StackedExperts, top_k: int) -> torch.nn.Module:
    """ScatterMoE's ``MLP`` holding a copy of `experts` (two layers, output width = input width)."""
    layers = experts.layers
    if len(layers) != 2 or experts.out_features != experts.in_features:
        raise ValueError(f"ScatterMoE runs two-layer experts mapping back to the input width; got widths "
                         f"{tuple(experts.widths)}")
    from scattermoe.mlp import MLP

    (w1, b1), (w2, b2) = layers
    module = MLP(input_size=experts.in_features, hidden_size=w1.shape[1], num_experts=experts.num_experts,
                 top_k=top_k, bias=b1 is not None, activation=experts.activation).to(device=w1.device,
                                                                                    dtype=w1.dtype)
    with torch.no_grad():
        module.experts.weight.copy_(w1)
        module.output_experts.weight.copy_(w2)
        if b1 is not None:
            module.experts.bias.copy_(b1)
            module.output_experts.bias.copy_(b2)
    return module


def _build_scattermoe(x, experts, index, weight, top_k):
    module = scattermoe_module(experts, top_k)

    def forward() -> torch.Tensor:
        return module(x, weight, index)
    forward.leaves = [weight, *module.parameters()]
    return forward


def _liger_moe_class() -> type:
    for module, name in LIGER_MOE_CANDIDATES:
        try:
            found = getattr(_import(module), name, None)
        except ImportError:
            continue
        if found is not None:
            return found
    raise LookupError("no fused MoE under " + ", ".join(f"{m}.{n}" for m, n in LIGER_MOE_CANDIDATES))


def _build_liger(x, experts, index, weight, top_k):
    function = _liger_moe_class()
    hidden = experts.widths[1] if len(experts.widths) > 2 else experts.out_features
    width = experts.in_features
    gate_up = (torch.randn(experts.num_experts, 2 * hidden, width, device=x.device, dtype=x.dtype)
               / width ** 0.5).requires_grad_()
    down = (torch.randn(experts.num_experts, width, hidden, device=x.device, dtype=x.dtype)
            / hidden ** 0.5).requires_grad_()
    index32 = index.to(torch.int32)

    def forward() -> torch.Tensor:
        return function.apply(x, gate_up, down, index32, weight)
    forward.leaves = [gate_up, down]
    return forward


PEERS = (
    Peer("peer_grouped_gemm", "grouped_gemm", "exact case: our weights, bias, GELU and routing", True,
         _build_grouped_gemm),
    Peer("peer_sonic_moe", "sonic-moe", "own router and weights, square experts, non-gated SiLU, no bias", False,
         _build_sonic, square_only=True),
    Peer("peer_scattermoe", "scattermoe", "exact case (square experts): our weights, bias, GELU and routing", True,
         _build_scattermoe, square_only=True),
    Peer("peer_liger_moe", "liger-kernel", "our routing, own weights, square SwiGLU experts (1.5× our FLOPs), no bias",
         False,
         _build_liger, square_only=True),
)
PEER_NAMES = tuple(peer.name for peer in PEERS)


def peer(name: str) -> Peer:
    return next(p for p in PEERS if p.name == name)


def reference_check(out: torch.Tensor, reference: torch.Tensor, tolerance: float) -> float:
    """Relative error of an exact peer against cmoe's loop (raises above `tolerance`)."""
    error = float((out.detach().double() - reference.double()).norm() / reference.double().norm().clamp_min(1e-30))
    if error > tolerance:
        raise AssertionError(f"relative error {error:.2e} against cmoe's loop backend")
    return error
