"""Shape cases and the implementations compared on them, shared by ``test_dispatch.py`` and the runner
(``run.py``, ``timing.py``, ``tables.py``).

A case is one routed projection ``y[t] = Σ_j w[t, j] · Expert_{i[t, j]}(x[t])``: ``T`` tokens, ``in`` → ``out``
features, ``E`` experts, top-``k`` routing, linear or two-layer GELU MLP experts (hidden = out), float32.
Routing is random but fixed by a seed: ``k`` distinct experts per token from ``randn(T, E).topk(k)``, their
scores softmax-normalised into the mixing weights.

The implementations, each timed on the same inputs and expert weights:

* ``triton`` / ``sorted`` / ``grouped_mm`` / ``loop`` / ``dense`` — `cmoe.moe_project` with that backend
  (``triton``: the fused kernels of `cmoe.kernels`, where they can run; ``sorted`` is the per-expert
  cuBLAS/MKL matmul loop over expert-sorted rows; ``grouped_mm`` one torch grouped GEMM per layer);
* ``auto`` — `cmoe.moe_project` with ``backend="auto"``: it times its candidates on the (untimed) warm-up
  call and the report says which one it picked per mode (`auto_choice`);
* ``torch_grouped_mm`` — ``torch._grouped_mm`` (CUDA, bf16, where the build has it) on a permuted copy of the
  rows, scattered back with ``index_add_``;
* ``every_expert`` — what the original Uni-Med computes: every expert on all tokens in a Python list
  comprehension, ``torch.stack``, then a weighted sum with the dense ``[T, E]`` mixing matrix;
* ``hf_eager`` / ``hf_batched_mm`` / ``hf_grouped_mm`` — Hugging Face's non-gated experts
  (``NemotronHExperts``) under each ``config._experts_implementation``, loaded with *our* weights; only on
  the square, bias-free "HF-compatible" cases, because those experts map ``hidden → hidden``;
* ``peer_*`` — other projects' kernels where installed (CUDA; `cmoe.benchmarks.peers` says which shape each runs);
* ``dense_matmul_roofline`` — plain dense matmuls with the same FLOPs as the routed work
  (``[T·k, in] @ [in, hidden]``, GELU, ``@ [hidden, out]``): the speed the routed work would have if
  routing cost nothing.

CPU shapes are stand-ins sized for a 2-core machine; the Uni-Med connector they stand in for projects ~8k
visual tokens from 5632 to 4096 features, which is what the GPU shapes use.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

import cmoe
from cmoe.benchmarks.peers import PEER_NAMES, peer, reference_check, skip_reason, sorted_grouped_layers
from cmoe.auto import Choice, auto_choices, shape_class
from cmoe.experts import StackedExperts
from cmoe.routers import expert_counts

ROOFLINE = "dense_matmul_roofline"
BACKEND_IMPLEMENTATIONS = ("triton", "sorted", "grouped_mm", "loop", "dense", "auto")
TORCH_GROUPED_MM = "torch_grouped_mm"
HF_IMPLEMENTATIONS = {"hf_eager": "eager", "hf_batched_mm": "batched_mm", "hf_grouped_mm": "grouped_mm"}
IMPLEMENTATIONS = (ROOFLINE, *BACKEND_IMPLEMENTATIONS, TORCH_GROUPED_MM, "every_expert", *HF_IMPLEMENTATIONS,
                   *PEER_NAMES)
MODES = ("forward", "forward_backward")

AGREEMENT_RTOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}
# hf_batched_mm gathers one copy of its expert's weights per (token, slot): skip it above this many bytes.
BATCHED_MM_MAX_BYTES = 4 * 2**30


@dataclass(frozen=True)
class Case:
    """One benchmark shape: ``tokens`` routed through ``top_k`` of ``num_experts`` experts ``in → out``."""

    tokens: int
    in_features: int
    out_features: int
    num_experts: int
    top_k: int
    kind: str
    hf: bool = False
    dtype: torch.dtype = torch.float32
    hidden: int | None = None

    @property
    def hidden_features(self) -> int | None:
        """The MLP experts' hidden width (= out as Uni-Med's experts, unless given); None for linear experts."""
        if self.kind != "mlp":
            return None
        return self.hidden or self.out_features

    @property
    def bias(self) -> bool:
        """HF's non-gated experts have no bias, so the HF-compatible cases have none either."""
        return not self.hf

    @property
    def name(self) -> str:
        prefix = "hf-" if self.hf else ""
        hidden = f"-hid{self.hidden}" if self.hidden else ""
        return (f"{prefix}{self.kind}-T{self.tokens}-in{self.in_features}{hidden}-out{self.out_features}"
                f"-E{self.num_experts}-k{self.top_k}")

    @property
    def flops(self) -> int:
        """Multiply-add FLOPs of the routed work alone (what every implementation must at least do)."""
        rows = self.tokens * self.top_k
        if self.kind == "mlp":
            hidden = self.hidden_features
            return 2 * rows * (self.in_features * hidden + hidden * self.out_features)
        return 2 * rows * self.in_features * self.out_features

    @property
    def implementations(self) -> tuple[str, ...]:
        """The implementations that apply to this case (the HF ones only on HF-compatible cases)."""
        return tuple(name for name in IMPLEMENTATIONS if self.hf or name not in HF_IMPLEMENTATIONS)


def _grid(tokens: int, in_features: int, out_features: int) -> list[Case]:
    return [Case(tokens, in_features, out_features, experts, k, kind)
            for kind in ("linear", "mlp") for experts in (4, 8) for k in (1, 2)]


def _dense_routing_cases(tokens: int, in_features: int, out_features: int) -> list[Case]:
    """Every expert active for every token (Uni-Med's soft router): where ``auto`` picks ``dense``."""
    return [Case(tokens, in_features, out_features, 4, 4, kind) for kind in ("linear", "mlp")]


def _hf_cases(tokens: int, width: int) -> list[Case]:
    return [Case(tokens, width, width, 8, 2, "mlp", hf=True), Case(tokens, width, width, 4, 1, "mlp", hf=True)]


def cpu_cases() -> list[Case]:
    """CPU-sized stand-ins for Uni-Med's ~8k tokens × 5632 → 4096, plus square HF-compatible MLP cases, and the
    E=8, k=2 MLP case at 4k tokens (the issue's CPU roofline target is stated for 4k–16k tokens)."""
    return (_grid(2048, 1408, 2048) + _dense_routing_cases(2048, 1408, 2048) + _hf_cases(2048, 2048)
            + [Case(4096, 1408, 2048, 8, 2, "mlp")])


GPU_DTYPE = torch.bfloat16


def gpu_cases() -> list[Case]:
    """Connector shapes in bf16: E=8, k=2 MLP experts at 4k/16k/64k tokens × (1408 → 2048, 5632 → 4096), the
    other expert kinds and routings at 16k × 5632 → 4096, dense routing, HF-compatible square cases, and one
    LLM-FFN-like shape (4096 → 14336 → 4096, E=8, k=2) for comparison with published MoE kernels."""
    bf16 = GPU_DTYPE
    cases = [Case(tokens, width_in, width_out, 8, 2, "mlp", dtype=bf16)
             for width_in, width_out in ((1408, 2048), (5632, 4096)) for tokens in (4096, 16384, 65536)]
    cases += [Case(16384, 5632, 4096, 4, 1, "mlp", dtype=bf16), Case(16384, 5632, 4096, 8, 2, "linear", dtype=bf16),
              Case(16384, 5632, 4096, 4, 1, "linear", dtype=bf16), Case(16384, 5632, 4096, 4, 4, "mlp", dtype=bf16),
              Case(16384, 4096, 4096, 8, 2, "mlp", hf=True, dtype=bf16),
              Case(16384, 4096, 4096, 8, 2, "mlp", hf=True, dtype=bf16, hidden=14336)]
    return cases


def quick_cases() -> list[Case]:
    """Tiny shapes that run every implementation in well under a second (for tests)."""
    return [Case(64, 32, 48, 4, 2, "linear"), Case(64, 32, 48, 4, 2, "mlp"), Case(64, 48, 48, 4, 2, "mlp", hf=True)]


def default_cases(device: torch.device) -> list[Case]:
    """The full case list for `device`: GPU shapes on CUDA, the CPU stand-ins otherwise."""
    return gpu_cases() if device.type == "cuda" else cpu_cases()


def is_headline(case: Case) -> bool:
    """The E=8, k=2 MLP connector cases (hidden = out) the summary quotes."""
    return case.kind == "mlp" and case.num_experts == 8 and case.top_k == 2 and case.hidden is None


@dataclass
class Workload:
    """A case's tensors on a device: inputs, routing, expert weights and everything each implementation needs."""

    case: Case
    x: torch.Tensor
    experts: StackedExperts
    index: torch.Tensor
    weight: torch.Tensor
    roofline_tensors: list[torch.Tensor]
    hf_modules: dict[str, nn.Module] = field(default_factory=dict)
    peer_forwards: dict[str, Callable[[], torch.Tensor]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)

    @property
    def implementations(self) -> tuple[str, ...]:
        """The case's implementations that can run here (not skipped)."""
        return tuple(name for name in self.case.implementations if name not in self.skipped)


def _make_experts(case: Case) -> StackedExperts:
    if case.kind == "mlp":
        return cmoe.MLPExperts(case.num_experts, case.in_features, case.out_features,
                               hidden_features=case.hidden_features, bias=case.bias)
    return cmoe.LinearExperts(case.num_experts, case.in_features, case.out_features, bias=case.bias)


def _make_roofline_tensors(case: Case) -> list[torch.Tensor]:
    widths = [case.in_features, case.out_features]
    if case.kind == "mlp":
        widths = [case.in_features, case.hidden_features, case.out_features]
    rows = torch.randn(case.tokens * case.top_k, case.in_features)
    weights = [torch.randn(w_in, w_out) / w_in ** 0.5 for w_in, w_out in zip(widths[:-1], widths[1:])]
    return [rows, *weights]


def build_workload(case: Case, device: torch.device | str = "cpu", seed: int = 0) -> Workload:
    """Inputs, random top-k routing, experts and roofline operands for `case`, reproducible from `seed`.

    On HF-compatible cases this also builds the HF modules and checks each against the ``loop`` backend once;
    an HF implementation that raises (or would need more memory than `BATCHED_MM_MAX_BYTES`) is recorded in
    ``skipped`` with the reason instead.
    """
    device = torch.device(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        x = torch.randn(case.tokens, case.in_features, dtype=case.dtype)
        scores, index = torch.randn(case.tokens, case.num_experts).topk(case.top_k, dim=-1)
        experts = _make_experts(case)
        roofline_tensors = _make_roofline_tensors(case)
    experts = experts.to(device=device, dtype=case.dtype)
    workload = Workload(
        case=case,
        x=x.to(device).requires_grad_(),
        experts=experts,
        index=index.to(device),
        weight=scores.softmax(dim=-1).to(device=device, dtype=case.dtype).requires_grad_(),
        roofline_tensors=[t.to(device=device, dtype=case.dtype).requires_grad_() for t in roofline_tensors],
    )
    _check_optional_backends(workload)
    if case.hf:
        _add_hf_modules(workload)
    _add_peers(workload)
    return workload


def _add_peers(workload: Workload) -> None:
    """Build each installed peer at its closest shape; an exact peer is checked against ``loop`` first."""
    case = workload.case
    for name in PEER_NAMES:
        spec = peer(name)
        reason = skip_reason(spec, workload.x.device, case.in_features, case.out_features, case.hf)
        if reason is not None:
            workload.skipped[name] = reason
            continue
        try:
            forward = spec.build(workload.x, workload.experts, workload.index, workload.weight, case.top_k)
            with torch.no_grad():
                out = forward()
                if spec.exact:
                    reference_check(out, reference_output(workload), AGREEMENT_RTOL[case.dtype])
        except Exception as exc:  # a peer that fails here is reported, not fatal
            workload.skipped[name] = f"raised {type(exc).__name__}: {exc}"
            continue
        workload.peer_forwards[name] = forward
        workload.notes[name] = f"`{name}` runs: {spec.shape_note}"


def _check_optional_backends(workload: Workload) -> None:
    """Record why ``triton`` or ``torch_grouped_mm`` cannot run here; check ``torch_grouped_mm`` against loop."""
    device = workload.x.device
    backend = cmoe.BACKENDS.get("triton") if "triton" in cmoe.BACKENDS else None
    if backend is None or not backend.is_available(device) or device.type != "cuda":
        reason = backend.unavailable_reason(device) if backend is not None else None
        workload.skipped["triton"] = reason or "the fused kernels are timed on CUDA only (CPU: interpreter)"
    grouped = cmoe.BACKENDS.get("grouped_mm") if "grouped_mm" in cmoe.BACKENDS else None
    if grouped is None or not grouped.is_available(device):
        workload.skipped["grouped_mm"] = (grouped.unavailable_reason(device) if grouped is not None else
                                          "the grouped_mm backend is not registered")
    elif grouped.input_problem(workload.x, workload.experts) is not None:
        workload.skipped["grouped_mm"] = grouped.input_problem(workload.x, workload.experts)
    if device.type != "cuda" or not hasattr(torch, "_grouped_mm") or workload.case.dtype != torch.bfloat16:
        workload.skipped[TORCH_GROUPED_MM] = "needs CUDA, bf16 and a torch build with torch._grouped_mm"
        return
    try:
        with torch.no_grad():
            out = torch_grouped_mm(workload.x, workload.experts, workload.index, workload.weight)
    except Exception as exc:  # a build or GPU without grouped_mm support is reported, not fatal
        workload.skipped[TORCH_GROUPED_MM] = f"raised {type(exc).__name__}: {exc}"
        return
    error = relative_error(out, reference_output(workload))
    tolerance = AGREEMENT_RTOL[workload.case.dtype]
    assert error <= tolerance, f"torch_grouped_mm disagrees with cmoe's loop backend: relative error {error:.2e}"


def torch_grouped_mm(x: torch.Tensor, experts: StackedExperts, index: torch.Tensor,
                     weight: torch.Tensor) -> torch.Tensor:
    """Sort pairs by expert, copy their rows, ``torch._grouped_mm`` per layer, weighted ``index_add_`` back."""
    offsets = torch.cumsum(expert_counts(index, experts.num_experts), 0, dtype=torch.int32)
    return sorted_grouped_layers(x, experts, index, weight,
                                 lambda rows, w: torch._grouped_mm(rows, w.transpose(1, 2), offs=offsets))


def hf_import_error() -> str | None:
    """Why the HF experts cannot be imported, or None when they can."""
    try:
        from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHExperts  # noqa: F401
    except ImportError as exc:
        return f"transformers' NemotronHExperts is not importable ({exc})"
    return None


def build_hf_experts(experts: StackedExperts, implementation: str) -> nn.Module:
    """HF's non-gated ``NemotronHExperts`` with `experts`' weights (shared storage) and the given implementation."""
    from transformers.models.nemotron_h.configuration_nemotron_h import NemotronHConfig
    from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHExperts

    (up, up_bias), (down, down_bias) = experts.layers
    if up_bias is not None or down_bias is not None or experts.activation_name != "gelu":
        raise ValueError("HF's NemotronHExperts has no bias and this benchmark uses exact GELU experts")
    config = NemotronHConfig(n_routed_experts=experts.num_experts, hidden_size=experts.in_features,
                             moe_intermediate_size=up.shape[1], mlp_hidden_act="gelu")
    config._experts_implementation = implementation
    module = NemotronHExperts(config)
    module.up_proj.data = up.detach()
    module.down_proj.data = down.detach()
    return module


def _batched_mm_bytes(case: Case) -> int:
    hidden = case.hidden_features or case.out_features
    per_row = case.in_features * hidden + hidden * case.out_features
    return case.tokens * case.top_k * per_row * torch.finfo(case.dtype).bits // 8


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``‖out − ref‖ / ‖ref‖`` in float64."""
    out, ref = out.detach().double(), ref.detach().double()
    return float((out - ref).norm() / ref.norm().clamp_min(torch.finfo(torch.float64).tiny))


def reference_output(workload: Workload) -> torch.Tensor:
    """The ``loop`` backend's output: the reference every other implementation must match."""
    with torch.no_grad():
        return cmoe.moe_project(workload.x, workload.experts, workload.index, workload.weight, backend="loop")


def _add_hf_modules(workload: Workload) -> None:
    reason = hf_import_error()
    if reason is not None:
        workload.skipped.update(dict.fromkeys(HF_IMPLEMENTATIONS, reason))
        return
    reference = reference_output(workload)
    for name, implementation in HF_IMPLEMENTATIONS.items():
        if implementation == "batched_mm" and _batched_mm_bytes(workload.case) > BATCHED_MM_MAX_BYTES:
            workload.skipped[name] = (f"gathers a weight copy per (token, slot): "
                                      f"{_batched_mm_bytes(workload.case) / 2**30:.0f} GiB here")
            continue
        module = build_hf_experts(workload.experts, implementation)
        try:
            with torch.no_grad():
                out = module(workload.x, workload.index, workload.weight)
        except Exception as exc:  # an implementation this torch/device lacks is reported, not fatal
            workload.skipped[name] = f"raised {type(exc).__name__}: {exc}"
            continue
        error = relative_error(out, reference)
        assert error <= AGREEMENT_RTOL[workload.case.dtype], f"{name} disagrees with cmoe's loop backend: relative error {error:.2e}"
        workload.hf_modules[name] = module


def every_expert(x: torch.Tensor, experts: StackedExperts, index: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The original Uni-Med computation: all experts on all tokens, stacked, mixed by the dense ``[T, E]`` weights."""
    mixing = weight.new_zeros(x.shape[0], experts.num_experts).scatter(1, index, weight)
    outputs = torch.stack([experts.forward_expert(e, x) for e in range(experts.num_experts)], dim=1)
    return (outputs * mixing.unsqueeze(-1)).sum(dim=1)


def dense_matmul_roofline(rows: torch.Tensor, *weights: torch.Tensor) -> torch.Tensor:
    """``[T·k, in] @ [in, hidden]``, GELU, ``@ [hidden, out]`` (linear: one matmul): routed FLOPs, no routing."""
    hidden = rows @ weights[0]
    for weight in weights[1:]:
        hidden = F.gelu(hidden) @ weight
    return hidden


def forward_fn(workload: Workload, name: str) -> Callable[[], torch.Tensor]:
    """A zero-argument callable computing implementation `name`'s output on `workload` (grad mode as ambient)."""
    w = workload
    if name == ROOFLINE:
        return lambda: dense_matmul_roofline(*w.roofline_tensors)
    if name in BACKEND_IMPLEMENTATIONS:
        return lambda: cmoe.moe_project(w.x, w.experts, w.index, w.weight, backend=name)
    if name == "every_expert":
        return lambda: every_expert(w.x, w.experts, w.index, w.weight)
    if name == TORCH_GROUPED_MM:
        return lambda: torch_grouped_mm(w.x, w.experts, w.index, w.weight)
    if name in w.hf_modules:
        module = w.hf_modules[name]
        return lambda: module(w.x, w.index, w.weight)
    if name in w.peer_forwards:
        return w.peer_forwards[name]
    raise KeyError(f"implementation {name!r} is not available on case {w.case.name}: "
                   f"{w.skipped.get(name, 'unknown implementation')}")


def auto_choice(workload: Workload, mode: str) -> Choice | None:
    """What ``backend="auto"`` picked on `workload` in `mode` (None if auto has not run it in this process)."""
    flat_x = workload.x.reshape(-1, workload.x.shape[-1])
    with torch.set_grad_enabled(mode == "forward_backward"):
        key = shape_class(flat_x, workload.experts, workload.index, workload.weight).key
    return auto_choices().get(key)


def _grad_leaves(workload: Workload, name: str) -> list[torch.Tensor]:
    if name == ROOFLINE:
        return list(workload.roofline_tensors)
    if name in workload.peer_forwards:
        return [workload.x, *getattr(workload.peer_forwards[name], "leaves", [])]
    module = workload.hf_modules.get(name, workload.experts)
    return [workload.x, workload.weight, *module.parameters()]


def make_callable(workload: Workload, name: str, mode: str) -> Callable[[], torch.Tensor]:
    """The callable to time: ``forward`` runs under ``no_grad``; ``forward_backward`` clears grads, runs forward
    with grads on x, expert weights and routing weights, then ``out.sum().backward()``."""
    forward = forward_fn(workload, name)
    if mode == "forward":
        def run_forward() -> torch.Tensor:
            with torch.no_grad():
                return forward()
        return run_forward
    if mode != "forward_backward":
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    leaves = _grad_leaves(workload, name)

    def clear_grads() -> None:
        for leaf in leaves:
            leaf.grad = None

    def run_forward_backward() -> torch.Tensor:
        clear_grads()
        out = forward()
        out.sum().backward()
        return out
    run_forward_backward.clear_grads = clear_grads  # the runner frees stale grads before a memory baseline
    return run_forward_backward
