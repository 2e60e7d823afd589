"""The fused ``triton`` dispatch: alignment, kernel launches, and the custom ops that train through them.

`triton_moe_project` is what the ``triton`` backend calls. It runs ``torch.ops.cmoe.triton_moe_forward``, a
`torch.library` custom op with a registered autograd formula (``cmoe::triton_moe_backward``) and fake
(meta) implementations, so autograd, ``torch.compile`` and CUDA-graph capture see one opaque op per call.
Forward runs one `grouped_gemm_kernel` per expert layer (gathering the first layer's rows from ``x``,
scattering the last layer's into token order); backward runs, per layer from the last, one weight-gradient
launch and one input-gradient launch (which also yields the routing-weight gradient on the last layer and the
activation's derivative on the others). No launch depends on a value read back to the host, so a warmed-up
step can be captured in a CUDA graph.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.testing

from cmoe.dispatch import accumulate_dtype
from cmoe.errors import CMoEError
from cmoe.experts import StackedExperts

from cmoe.kernels import tuning
from cmoe.kernels.triton_kernels import (
    ACT_IDS,
    INTERPRETED,
    DOT_GATHERED,
    DOT_NONE,
    DOT_PADDED,
    OUT_PADDED,
    OUT_TOKEN_ATOMIC,
    OUT_TOKEN_STORE,
    count_kernel,
    grouped_gemm_kernel,
    grouped_wgrad_kernel,
    place_kernel,
)

ALIGN_BLOCK = 256
MAX_EXPERTS = 64


@dataclass(frozen=True)
class Alignment:
    """The expert-sorted, block-padded layout of the T·k (token, slot) pairs.

    ``sorted_pair[p]`` is the pair id ``t·k + j`` at padded row p (``num_pairs`` in padding rows);
    ``block_expert[b]`` the expert of M-block b (-1 for blocks past the used ones); ``block_offsets[e]`` the
    first M-block of expert e (``[E + 1]``). Sizes are static upper bounds, so building it needs no host sync.
    """

    sorted_pair: torch.Tensor
    block_expert: torch.Tensor
    block_offsets: torch.Tensor
    num_pairs: int
    top_k: int
    block_m: int

    @property
    def num_blocks(self) -> int:
        return self.block_expert.shape[0]

    @property
    def padded_rows(self) -> int:
        return self.num_blocks * self.block_m


def _next_power_of_two(n: int) -> int:
    return 1 << max(1, (n - 1).bit_length())


def align(expert_index: torch.Tensor, num_experts: int, block_m: int) -> Alignment:
    """Sort the pairs of ``expert_index [T, k]`` by expert (stable) and pad every expert's run to ``block_m``."""
    num_tokens, top_k = expert_index.shape
    num_pairs = num_tokens * top_k
    device = expert_index.device
    flat = expert_index.reshape(-1).contiguous()
    chunks = triton.cdiv(num_pairs, ALIGN_BLOCK)
    e_pow2 = _next_power_of_two(num_experts)
    chunk_counts = torch.empty(chunks, num_experts, dtype=torch.int32, device=device)
    count_kernel[(chunks,)](flat, chunk_counts, num_pairs, num_experts, BLOCK=ALIGN_BLOCK, E_POW2=e_pow2)
    counts = chunk_counts.sum(0, dtype=torch.int64)
    blocks = (counts + block_m - 1) // block_m
    block_end = torch.cumsum(blocks, 0)
    block_start = block_end - blocks
    chunk_prefix = torch.cumsum(chunk_counts, 0, dtype=torch.int64) - chunk_counts
    chunk_base = (block_start * block_m).unsqueeze(0) + chunk_prefix
    num_blocks = num_pairs // block_m + num_experts
    sorted_pair = torch.full((num_blocks * block_m,), num_pairs, dtype=torch.int32, device=device)
    place_kernel[(chunks,)](flat, chunk_base, sorted_pair, num_pairs, num_experts, BLOCK=ALIGN_BLOCK,
                            E_POW2=e_pow2)
    block_ids = torch.arange(num_blocks, device=device)
    block_expert = torch.searchsorted(block_end, block_ids, right=True)
    block_expert = torch.where(block_expert < num_experts, block_expert, -1).to(torch.int32)
    block_offsets = torch.cat([block_end.new_zeros(1), block_end]).to(torch.int32)
    return Alignment(sorted_pair, block_expert, block_offsets, num_pairs, top_k, block_m)


def _upcast_dot(dtype: torch.dtype) -> bool:
    """The CPU interpreter's dot (numpy) cannot multiply bfloat16: upcast there, never on a GPU."""
    return INTERPRETED and dtype == torch.bfloat16


def _precision(dtype: torch.dtype) -> str:
    """fp32 dots follow torch's matmul setting (TF32 only where torch would use it); fp64 is always exact;
    bf16/fp16 ignore it."""
    if dtype == torch.float64 or (dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32):
        return "ieee"
    return "tf32"


def _bench(launch, reset) -> callable:
    def bench(config: tuning.KernelConfig) -> float:
        launch(config)
        ms = triton.testing.do_bench(lambda: launch(config), warmup=5, rep=20)
        reset()
        return ms
    return bench


def _weight_descriptor(config: tuning.KernelConfig, weight: torch.Tensor, stride_bk: int, stride_bn: int) -> int:
    """`grouped_gemm_kernel`'s ``B_DESC`` for `config`: 0 (pointer loads) unless the config asks for the
    tensor-descriptor weight loads and the weight fits one (a contiguous last dimension, the other strides and
    the base address 16-byte aligned, as TMA requires). Descriptors built inside a kernel need Triton's scratch
    allocator on a GPU, set here the first time (torch memory)."""
    if not config.tma_weight or 1 not in (stride_bn, stride_bk):
        return 0
    row_stride = stride_bk if stride_bn == 1 else stride_bn
    size = weight.element_size()
    if weight.data_ptr() % 16 or (weight.stride(0) * size) % 16 or (row_stride * size) % 16:
        return 0
    if weight.device.type == "cuda":
        _ensure_triton_allocator()
    return 1 if stride_bn == 1 else 2


PERSISTENT_WAVES = 2
"""Programs per SM of a persistent launch (two resident programs hide one's epilogue behind the other's loads)."""
INTERPRETER_PROGRAMS = 3
"""Programs of a persistent launch in the CPU interpreter: few, so each loops over several tiles, unevenly."""


@functools.cache
def _persistent_programs(device: torch.device) -> int:
    """How many programs a persistent `grouped_gemm_kernel` launch starts on `device`."""
    if device.type != "cuda":
        return INTERPRETER_PROGRAMS
    return PERSISTENT_WAVES * torch.cuda.get_device_properties(device).multi_processor_count


@functools.cache
def _ensure_triton_allocator() -> None:
    triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device="cuda"))


def _shape_key(al: Alignment, dtype: torch.dtype, num_experts: int, n: int, k: int, *flags) -> tuple:
    return (str(dtype), num_experts, n, k, al.top_k > 1, _next_power_of_two(al.num_pairs), *flags)


def gemm(al: Alignment, a: torch.Tensor, weight: torch.Tensor, *, transpose_weight: bool, a_gather: bool,
         out: torch.Tensor, out_mode: int, bias: torch.Tensor | None = None, activation: int = 0,
         preact: torch.Tensor | None = None, dot_src: torch.Tensor | None = None, dot_mode: int = DOT_NONE,
         act_src: torch.Tensor | None = None, act_grad: int = 0, route_weight: torch.Tensor | None = None,
         role: str = "forward") -> torch.Tensor | None:
    """One `grouped_gemm_kernel` launch: ``out ← epilogue(A[rows] @ op(W[expert]))``.

    ``op(W)`` is ``W[e]ᵀ`` (``[in, out]``, forward) when `transpose_weight`, else ``W[e]`` (input gradients).
    Returns the ``[N-tiles, padded rows]`` partial dots when `dot_mode` asks for them.
    """
    num_experts = weight.shape[0]
    if transpose_weight:
        n, k = weight.shape[1], weight.shape[2]
        stride_bk, stride_bn = weight.stride(2), weight.stride(1)
    else:
        k, n = weight.shape[1], weight.shape[2]
        stride_bk, stride_bn = weight.stride(1), weight.stride(2)
    dummy = out
    dot_out_holder: list[torch.Tensor | None] = [None]

    def launch(config: tuning.KernelConfig) -> None:
        n_tiles = triton.cdiv(n, config.block_n)
        dot_out = dummy
        if dot_mode != DOT_NONE:
            dot_out = torch.empty(n_tiles, al.padded_rows, dtype=accumulate_dtype(a.dtype), device=a.device)
            dot_out_holder[0] = dot_out
        num_tiles = al.num_blocks * n_tiles
        grid = (min(num_tiles, _persistent_programs(a.device)) if config.persistent else num_tiles,)
        grouped_gemm_kernel[grid](
            a, weight, bias if bias is not None else dummy, out, preact if preact is not None else dummy,
            dot_src if dot_src is not None else dummy, dot_out, act_src if act_src is not None else dummy,
            route_weight if route_weight is not None else dummy, al.sorted_pair, al.block_expert,
            al.num_pairs, al.top_k, n, k, al.num_blocks, num_experts, num_tiles,
            a.stride(0), weight.stride(0), stride_bk, stride_bn, bias.stride(0) if bias is not None else 0,
            out.stride(0), preact.stride(0) if preact is not None else 0,
            dot_src.stride(0) if dot_src is not None else 0, act_src.stride(0) if act_src is not None else 0,
            A_GATHER=a_gather, HAS_BIAS=bias is not None, ACT=activation, STORE_PREACT=preact is not None,
            DOT_SRC=dot_mode, ACT_GRAD=act_grad, SCALE_BY_WEIGHT=route_weight is not None, OUT_MODE=out_mode,
            PRECISION=_precision(a.dtype), ACC_F64=a.dtype == torch.float64, UPCAST_DOT=_upcast_dot(a.dtype),
            B_DESC=_weight_descriptor(config, weight, stride_bk, stride_bn), PERSISTENT=bool(config.persistent),
            BLOCK_M=al.block_m,
            GROUP_M=config.group_m,
            **config.launch_options(),
        )

    def reset() -> None:
        if out_mode == OUT_TOKEN_ATOMIC:
            out.zero_()

    key = _shape_key(al, a.dtype, num_experts, n, k, transpose_weight, a_gather, out_mode, activation, act_grad,
                     dot_mode)
    config = tuning.choose(role, key, al.block_m, a.element_size(), INTERPRETED, _bench(launch, reset))
    launch(config)
    return dot_out_holder[0]


def weight_grad(al: Alignment, dy: torch.Tensor, a: torch.Tensor, *, a_gather: bool, num_experts: int,
                has_bias: bool, splits: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``dW [E, N, K]`` (in `a`'s dtype) and ``db [E, N]`` (accumulate dtype) of one layer from its output grad
    `dy` (padded layout, zero in padding rows) and its input `a` (x gathered by token when `a_gather`, else
    padded).

    Each expert's rows are split over `splits` programs per tile (default: enough programs to fill the GPU
    even if one expert got every token); one split stores its tile, several add into a zeroed fp32 buffer.
    """
    n, k = dy.shape[1], a.shape[1]
    acc = accumulate_dtype(a.dtype)
    sms = (torch.cuda.get_device_properties(a.device).multi_processor_count if a.device.type == "cuda" else 4)
    buffers: dict[int, torch.Tensor] = {}

    def plan(config: tuning.KernelConfig) -> tuple[int, int, int]:
        tiles = triton.cdiv(n, config.block_n) * triton.cdiv(k, config.block_k)
        wanted = splits if splits is not None else triton.cdiv(2 * sms, tiles)
        per_split = triton.cdiv(al.num_blocks, max(1, min(al.num_blocks, wanted)))
        return tiles, triton.cdiv(al.num_blocks, per_split), per_split

    def output(num_splits: int) -> torch.Tensor:
        if num_splits not in buffers:
            buffers[num_splits] = (torch.zeros(num_experts, n, k, dtype=acc, device=a.device) if num_splits > 1
                                   else torch.empty(num_experts, n, k, dtype=a.dtype, device=a.device))
        return buffers[num_splits]

    def launch(config: tuning.KernelConfig) -> None:
        tiles, num_splits, per_split = plan(config)
        dw = output(num_splits)
        grouped_wgrad_kernel[(tiles, num_experts, num_splits)](
            dy, a, dw, al.sorted_pair, al.block_offsets, al.num_pairs, al.top_k, n, k, per_split,
            dy.stride(0), a.stride(0), dw.stride(0), dw.stride(1),
            A_GATHER=a_gather, ATOMIC=num_splits > 1,
            PRECISION=_precision(a.dtype), ACC_F64=a.dtype == torch.float64, UPCAST_DOT=_upcast_dot(a.dtype),
            STAGE_ROWS=a_gather and config.stage_rows > 0,
            BLOCK_M=al.block_m, GROUP_N=config.group_m, **config.launch_options(),
        )

    def reset() -> None:
        for num_splits, buffer in buffers.items():
            if num_splits > 1:
                buffer.zero_()

    key = _shape_key(al, a.dtype, num_experts, n, k, a_gather)
    config = tuning.choose("weight_grad", key, al.block_m, a.element_size(), INTERPRETED, _bench(launch, reset),
                           gather=a_gather)
    launch(config)
    dw = output(plan(config)[1]).to(a.dtype)
    return dw, (_bias_grad(al, dy, num_experts) if has_bias else None)


def _bias_grad(al: Alignment, dy: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``db[e] = Σ dY`` over expert e's rows, as one ``[E, rows] @ dY`` GEMM with the rows' one-hot expert
    matrix: fp32 accumulation without an fp32 copy of dY (a ``sum(dtype=float32)`` would make one)."""
    experts = torch.arange(num_experts, device=dy.device, dtype=al.block_expert.dtype)
    onehot = (al.block_expert.unsqueeze(0) == experts.unsqueeze(1)).to(dy.dtype)
    onehot = onehot.unsqueeze(2).expand(num_experts, al.num_blocks, al.block_m).reshape(num_experts, -1)
    return (onehot @ dy).to(accumulate_dtype(dy.dtype))


def padded_weighted_rows(al: Alignment, rows: torch.Tensor, route_weight: torch.Tensor) -> torch.Tensor:
    """``out[p] = w[pair_p] · rows[token_p]`` in the padded layout, zero in padding rows (no host sync)."""
    token = torch.clamp(al.sorted_pair.long() // al.top_k, max=rows.shape[0] - 1)
    weight = torch.cat([route_weight, route_weight.new_zeros(1)]).index_select(0, al.sorted_pair.long())
    return (rows.index_select(0, token) * weight.unsqueeze(1)).to(rows.dtype)


def _token_order_output(x: torch.Tensor, width: int, top_k: int) -> tuple[torch.Tensor, int]:
    """A ``[T, width]`` buffer in token order and how the kernel fills it: every token has exactly one pair
    when k = 1 (a plain store in x's dtype), else its k pairs add into a zeroed accumulate-dtype buffer."""
    if top_k == 1:
        return torch.empty(x.shape[0], width, dtype=x.dtype, device=x.device), OUT_TOKEN_STORE
    return torch.zeros(x.shape[0], width, dtype=accumulate_dtype(x.dtype), device=x.device), OUT_TOKEN_ATOMIC


def _alignment(index: torch.Tensor, sorted_pair: torch.Tensor, block_expert: torch.Tensor,
               block_offsets: torch.Tensor, block_m: int) -> Alignment:
    return Alignment(sorted_pair, block_expert, block_offsets, index.numel(), index.shape[1], block_m)


def _num_blocks(num_pairs: int, num_experts: int, block_m: int) -> int:
    """The static upper bound on M-blocks `align` allocates (every expert's run padded by < one block)."""
    return num_pairs // block_m + num_experts


@torch.library.custom_op("cmoe::triton_moe_forward", mutates_args=())
def triton_moe_forward(x: torch.Tensor, index: torch.Tensor, weight: torch.Tensor, weights: list[torch.Tensor],
                       biases: list[torch.Tensor], has_bias: list[bool], activation: str, block_m: int,
                       keep_activations: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                        list[torch.Tensor], list[torch.Tensor]]:
    """``y = Σ_j w[:, j] · Expert_{i[:, j]}(x)`` through the fused kernels, as one opaque op for autograd and
    ``torch.compile``. ``weights`` are the expert layers' stacked ``[E, out, in]``; ``biases`` the ``[E, out]``
    of the layers whose `has_bias` is true (a plain tensor list: autograd does not differentiate through a list
    that holds None).

    Returns y, the alignment (``sorted_pair``, ``block_expert``, ``block_offsets``), every hidden layer's output
    in the padded layout and, with `keep_activations`, their pre-activations: what the backward needs.
    """
    num_tokens, top_k = index.shape
    num_layers = len(weights)
    al = align(index, weights[0].shape[0], block_m)
    route_weight = weight.reshape(-1)
    act = ACT_IDS[activation]
    hidden, preacts = [], []
    h = x
    for depth, (w, b) in enumerate(zip(weights, _per_layer(biases, has_bias))):
        first, last = depth == 0, depth == num_layers - 1
        if last:
            out, mode = _token_order_output(x, w.shape[1], top_k)
            gemm(al, h, w, transpose_weight=True, a_gather=first, out=out, out_mode=mode, bias=b,
                 route_weight=route_weight)
            h = out.to(x.dtype)
        else:
            out = torch.empty(al.padded_rows, w.shape[1], dtype=x.dtype, device=x.device)
            preact = torch.empty_like(out) if keep_activations else None
            gemm(al, h, w, transpose_weight=True, a_gather=first, out=out, out_mode=OUT_PADDED, bias=b,
                 activation=act, preact=preact)
            hidden.append(out)
            if preact is not None:
                preacts.append(preact)
            h = out
    return h, al.sorted_pair, al.block_expert, al.block_offsets, hidden, preacts


@triton_moe_forward.register_fake
def _triton_moe_forward_fake(x, index, weight, weights, biases, has_bias, activation, block_m, keep_activations):
    num_blocks = _num_blocks(index.shape[0] * index.shape[1], weights[0].shape[0], block_m)
    rows = num_blocks * block_m
    hidden = [x.new_empty(rows, w.shape[1]) for w in weights[:-1]]
    preacts = [x.new_empty(rows, w.shape[1]) for w in weights[:-1]] if keep_activations else []
    int32 = torch.int32
    return (x.new_empty(index.shape[0], weights[-1].shape[1]), index.new_empty(rows, dtype=int32),
            index.new_empty(num_blocks, dtype=int32), index.new_empty(weights[0].shape[0] + 1, dtype=int32),
            hidden, preacts)


@torch.library.custom_op("cmoe::triton_moe_backward", mutates_args=())
def triton_moe_backward(grad_out: torch.Tensor, x: torch.Tensor, index: torch.Tensor, weight: torch.Tensor,
                        sorted_pair: torch.Tensor, block_expert: torch.Tensor, block_offsets: torch.Tensor,
                        hidden: list[torch.Tensor], preacts: list[torch.Tensor], weights: list[torch.Tensor],
                        biases: list[torch.Tensor], has_bias: list[bool], activation: str, block_m: int,
                        needs_x_grad: bool, needs_route_grad: bool
                        ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """The fused backward of `triton_moe_forward`: grads of x and of the routing weights (each empty when no
    launch computes it, see `_computed_input_grads`), of every layer's weights, and of `biases` (in order)."""
    grad_x_computed, _ = _computed_input_grads(len(weights), needs_x_grad, needs_route_grad)
    al = _alignment(index, sorted_pair, block_expert, block_offsets, block_m)
    per_layer_bias = _per_layer(biases, has_bias)
    num_layers = len(weights)
    num_tokens, top_k = index.shape
    num_experts = weights[0].shape[0]
    route_weight = weight.reshape(-1)
    act = ACT_IDS[activation]
    inputs = [x, *hidden]
    g = grad_out.contiguous().to(x.dtype)
    grads_w: list[torch.Tensor] = list(weights)  # each replaced by its gradient below
    grads_b: list[torch.Tensor | None] = [None] * num_layers
    grad_route = x.new_empty(0)
    grad_x = x.new_empty(0)
    dy = g
    for depth in reversed(range(num_layers)):
        first, last = depth == 0, depth == num_layers - 1
        w, b = weights[depth], per_layer_bias[depth]
        dy_padded = padded_weighted_rows(al, g, route_weight) if last else dy
        dw, db = weight_grad(al, dy_padded, inputs[depth], a_gather=first, num_experts=num_experts,
                             has_bias=b is not None)
        del dy_padded
        grads_w[depth] = dw.to(w.dtype)
        grads_b[depth] = db.to(b.dtype) if b is not None else None
        if first:
            if not grad_x_computed:
                continue
            target, mode = _token_order_output(x, x.shape[1], top_k)
            partials = gemm(al, dy, w, transpose_weight=False, a_gather=last, out=target, out_mode=mode,
                            dot_src=x if last else None, dot_mode=DOT_GATHERED if last else DOT_NONE,
                            route_weight=route_weight if last else None, role="backward_input")
            grad_x = target.to(x.dtype)
        else:
            target = torch.empty(al.padded_rows, w.shape[2], dtype=x.dtype, device=x.device)
            partials = gemm(al, dy, w, transpose_weight=False, a_gather=last, out=target, out_mode=OUT_PADDED,
                            dot_src=inputs[depth] if last else None, dot_mode=DOT_PADDED if last else DOT_NONE,
                            act_src=preacts[depth - 1], act_grad=act, route_weight=route_weight if last else None,
                            role="backward_input")
            dy = target
        if last and partials is not None:
            grad_route = _route_grad(al, partials, g, per_layer_bias[-1], index)
            grad_route = grad_route.to(weight.dtype).view(num_tokens, top_k)
    return grad_x, grad_route, grads_w, [gb for gb in grads_b if gb is not None]


@triton_moe_backward.register_fake
def _triton_moe_backward_fake(grad_out, x, index, weight, sorted_pair, block_expert, block_offsets, hidden, preacts,
                              weights, biases, has_bias, activation, block_m, needs_x_grad, needs_route_grad):
    has_grad_x, has_grad_route = _computed_input_grads(len(weights), needs_x_grad, needs_route_grad)
    grad_x = torch.empty_like(x) if has_grad_x else x.new_empty(0)
    grad_route = torch.empty_like(weight) if has_grad_route else weight.new_empty(0)
    return (grad_x, grad_route, [torch.empty_like(w) for w in weights],
            [torch.empty_like(b) for b in biases])


def _computed_input_grads(num_layers: int, needs_x_grad: bool, needs_route_grad: bool) -> tuple[bool, bool]:
    """Which of (grad x, grad routing weights) the backward computes. The first layer's input-gradient launch
    runs only when x needs a gradient, or when it is also the last layer and the routing weights need one (that
    launch yields both); the last layer's launch, when there are several, always runs and yields the routing
    gradient. Frozen visual features (x without grad) then cost no dx GEMM."""
    first_layer_launch = needs_x_grad or (num_layers == 1 and needs_route_grad)
    return first_layer_launch, num_layers > 1 or first_layer_launch


def _per_layer(biases: list[torch.Tensor], has_bias: list[bool]) -> list[torch.Tensor | None]:
    present = iter(biases)
    return [next(present) if has else None for has in has_bias]


def _setup_context(ctx, inputs, output) -> None:
    x, index, weight, weights, biases, has_bias, activation, block_m, keep_activations = inputs
    _, sorted_pair, block_expert, block_offsets, hidden, preacts = output
    # Only y gets a gradient; the other outputs are saved for backward. Without this, autograd would build a
    # zero gradient for each (a [padded rows, hidden] buffer per activation) and keep it through the backward.
    ctx.set_materialize_grads(False)
    ctx.layout = (len(weights), len(biases), list(has_bias), len(hidden), len(preacts), activation, block_m)
    ctx.save_for_backward(x, index, weight, sorted_pair, block_expert, block_offsets, *hidden, *preacts, *weights,
                          *biases)


def _backward(ctx, grad_out, *unused_grads):
    num_layers, num_biases, has_bias, num_hidden, num_preacts, activation, block_m = ctx.layout
    if grad_out is None:  # only the saved outputs got gradients (not materialised): nothing flows back
        return None, None, None, [None] * num_layers, [None] * num_biases, None, None, None, None
    x, index, weight, sorted_pair, block_expert, block_offsets, *rest = ctx.saved_tensors
    hidden, rest = rest[:num_hidden], rest[num_hidden:]
    preacts, rest = rest[:num_preacts], rest[num_preacts:]
    weights, biases = rest[:num_layers], rest[num_layers:num_layers + num_biases]
    needs_x_grad, needs_route_grad = bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[2])
    grad_x, grad_route, grads_w, grads_b = torch.ops.cmoe.triton_moe_backward(
        grad_out, x, index, weight, sorted_pair, block_expert, block_offsets, hidden, preacts, weights, biases,
        has_bias, activation, block_m, needs_x_grad, needs_route_grad)
    return (grad_x if ctx.needs_input_grad[0] else None, None, grad_route if ctx.needs_input_grad[2] else None,
            list(grads_w), list(grads_b), None, None, None, None)


torch.library.register_autograd("cmoe::triton_moe_forward", _backward, setup_context=_setup_context)


def _route_grad(al: Alignment, partials: torch.Tensor, g: torch.Tensor, last_bias: torch.Tensor | None,
                index: torch.Tensor) -> torch.Tensor:
    """``d w[t, j] = ⟨dy[t], Expert(x[t]) unweighted⟩``: the kernel's partial dots (without the bias) moved
    back to pair order, plus ``⟨dy[t], b_e⟩`` from one small ``[T, out] × [out, E]`` matmul."""
    per_row = partials.sum(0)
    flat = torch.zeros(al.num_pairs + 1, dtype=per_row.dtype, device=g.device)
    flat.scatter_(0, al.sorted_pair.long(), per_row)
    grad = flat[:al.num_pairs].view(index.shape)
    if last_bias is not None:
        grad = grad + (g.to(per_row.dtype) @ last_bias.to(per_row.dtype).t()).gather(1, index)
    return grad.reshape(-1)


def _check_supported(x: torch.Tensor, experts: StackedExperts) -> None:
    if experts.num_experts > MAX_EXPERTS:
        raise CMoEError(f"triton backend: expected at most {MAX_EXPERTS} experts, got {experts.num_experts}; "
                        "use backend='sorted' for more")
    if experts.activation_name not in ACT_IDS:
        raise CMoEError(f"triton backend: activation {experts.activation_name!r} has no fused kernel; known: "
                        f"{sorted(set(ACT_IDS) - {'identity'})}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise CMoEError(f"triton backend: expected x in float32, bfloat16, float16 or float64, got {x.dtype}")


def triton_moe_project(x: torch.Tensor, experts: StackedExperts, index: torch.Tensor, weight: torch.Tensor,
                       dense_fast_path: bool = True) -> torch.Tensor:
    """The ``triton`` backend: ``x [T, in]``, ``index``/``weight [T, k]`` → ``[T, out]``, differentiable.

    With every expert active (k = E) and `dense_fast_path`, the dense backend's one wide GEMM is used instead
    (no sorting or gathering is needed when every token visits every expert).
    """
    _check_supported(x, experts)
    num_tokens, top_k = index.shape
    if dense_fast_path and top_k == experts.num_experts:
        from cmoe.dispatch import dense_backend

        return dense_backend(x, experts, index, weight)
    block_m = tuning.default_block_m(num_tokens * top_k, experts.num_experts, INTERPRETED)
    weights = [w.to(x.dtype).contiguous() for w, _ in experts.layers]
    biases = [b.to(x.dtype).contiguous() for _, b in experts.layers if b is not None]
    has_bias = [b is not None for _, b in experts.layers]
    keep = torch.is_grad_enabled() and any(t.requires_grad for t in (x, weight, *weights, *biases))
    return torch.ops.cmoe.triton_moe_forward(x.contiguous(), index.contiguous(), weight.contiguous(), weights,
                                             biases, has_bias, experts.activation_name, block_m, keep)[0]
