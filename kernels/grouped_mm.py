"""The ``grouped_mm`` backend: one ``torch.nn.functional.grouped_mm`` per expert layer over expert-sorted rows.

The (token, slot) pairs are sorted by expert once; each layer is then a single grouped GEMM whose group ends
(``offsets``, int32) stay on the device, so nothing is read back to the host. Per layer it costs one GEMM
launch instead of ``sorted``'s E, and on CUDA (bf16, compute capability 9.x/10.x) torch runs it as one
CUTLASS grouped kernel.

What is not a GEMM, and how it avoids full-size passes:

* hidden-layer bias: gathered per row and added in place to the GEMM's output (the activation needs its
  input kept, so the in-place add saves one ``[T·k, hidden]`` buffer);
* last-layer bias: ``Σ_j w[t, j] · b[e(t, j)]`` is the small ``[T, E] @ [E, out]`` matmul of the routing
  weights, which also initialises the output (no zero fill, no ``[T·k, out]`` bias rows);
* routing weight: one multiply that also does the cast to the accumulation dtype, then one ``index_add_``.

torch's own limits, which this backend reports instead of failing deep inside the op:

* dtypes float32, bfloat16 and float16 (no float64, so ``gradcheck`` is not possible: tests compare with
  ``loop`` in float32); ``torch.compile`` traces bfloat16 only (the op's fake implementation rejects
  others);
* every row stride must be a multiple of 16 bytes: unaligned widths are zero-padded (a copy of the weights
  and of ``x`` per call, documented cost; the connector shapes are aligned);
* CUDA: torch's fast path needs bfloat16 on compute capability 9.x/10.x; elsewhere torch falls back to a
  loop that reads the offsets on the host (correct, but it syncs, like ``sorted``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cmoe.dispatch import accumulate_dtype
from cmoe.errors import CMoEError
from cmoe.experts import StackedExperts
from cmoe.routers import expert_counts

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _grouped_mm_function():
    """torch's public ``F.grouped_mm`` (torch ≥ 2.9), else the private ``torch._grouped_mm``, else None."""
    return getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


GROUPED_MM = _grouped_mm_function()


def unavailable_reason(device: torch.device | str) -> str | None:
    """None when this torch can run grouped GEMMs on `device`; otherwise why not."""
    device = torch.device(device)
    if GROUPED_MM is None:
        return f"torch {torch.__version__} has no grouped_mm (torch.nn.functional.grouped_mm needs torch >= 2.9)"
    if device.type not in ("cpu", "cuda"):
        return f"torch's grouped_mm runs on CPU and CUDA, not {device.type}"
    return None


def is_available(device: torch.device | str) -> bool:
    return unavailable_reason(device) is None


def input_problem(x: torch.Tensor, experts: StackedExperts) -> str | None:
    """None when the backend can run these inputs; otherwise what torch's grouped_mm lacks for them."""
    if x.dtype not in SUPPORTED_DTYPES:
        return (f"torch's grouped_mm supports {', '.join(str(d).removeprefix('torch.') for d in SUPPORTED_DTYPES)}"
                f", not {str(x.dtype).removeprefix('torch.')}")
    if torch.compiler.is_compiling() and x.dtype != torch.bfloat16:
        return "torch.compile traces torch's grouped_mm in bfloat16 only (its fake implementation rejects others)"
    return None


def _aligned(width: int, dtype: torch.dtype) -> int:
    """`width` rounded up so a row of it spans a multiple of 16 bytes (grouped_mm's stride rule)."""
    step = 16 // torch.empty((), dtype=dtype).element_size()
    return -(-width // step) * step


def _padded_layers(experts: StackedExperts, dtype: torch.dtype
                   ) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """The expert layers with every width zero-padded to the 16-byte rule (the layers themselves if aligned).

    The activations cmoe offers map 0 to 0, so padded hidden columns stay zero and meet zero weight columns.
    """
    layers = []
    for w, b in experts.layers:
        out_w, in_w = w.shape[1], w.shape[2]
        pad_out, pad_in = _aligned(out_w, dtype) - out_w, _aligned(in_w, dtype) - in_w
        if pad_out or pad_in:
            w = F.pad(w, (0, pad_in, 0, pad_out))
            b = None if b is None else F.pad(b, (0, pad_out))
        layers.append((w, b))
    return layers


def grouped_mm_backend(x: torch.Tensor, experts: StackedExperts, index: torch.Tensor,
                       weight: torch.Tensor) -> torch.Tensor:
    """Sort pairs by expert, one grouped GEMM per layer with device offsets, weighted ``index_add_`` back."""
    problem = input_problem(x, experts)
    if problem is not None:
        raise CMoEError(f"backend 'grouped_mm': {problem}; use backend='sorted' (or 'auto') for these inputs")
    num_tokens, top_k = index.shape
    flat = index.reshape(-1)
    expert_of_row, order = torch.sort(flat, stable=True)
    offsets = torch.cumsum(expert_counts(index, experts.num_experts), 0).to(torch.int32)
    token_of = order // top_k if top_k > 1 else order
    layers = _padded_layers(experts, x.dtype)
    padded_in = layers[0][0].shape[2]
    if padded_in != x.shape[1]:
        x = F.pad(x, (0, padded_in - x.shape[1]))
    hidden = x.index_select(0, token_of)
    for w, b in layers[:-1]:
        hidden = GROUPED_MM(hidden, w.transpose(1, 2), offs=offsets)
        if b is not None:
            hidden.add_(b.index_select(0, expert_of_row))
        hidden = experts.activation(hidden)
    w_last, b_last = layers[-1]
    hidden = GROUPED_MM(hidden, w_last.transpose(1, 2), offs=offsets)
    acc = accumulate_dtype(x.dtype)
    if b_last is None:
        out = hidden.new_zeros(num_tokens, w_last.shape[1], dtype=acc)
    else:
        mixing = weight.new_zeros(num_tokens, experts.num_experts, dtype=acc).scatter_add(1, index, weight.to(acc))
        out = (mixing @ b_last.to(acc)).to(acc)  # under autocast the matmul comes back in the autocast dtype
    slot_weight = weight.reshape(-1).index_select(0, order).to(acc)
    out = out.index_add_(0, token_of, (hidden * slot_weight[:, None]).to(acc))
    if out.shape[1] != experts.out_features:
        out = out[:, :experts.out_features]
    return out.to(x.dtype)
