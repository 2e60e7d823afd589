"""The Triton kernels behind the ``triton`` backend (imports triton; load through `cmoe.kernels.ops`).

Three kernels, all over the *aligned* layout built by `cmoe.kernels.align`: the T·k (token, slot) pairs sorted
by expert, each expert's run padded to a multiple of ``BLOCK_M`` with a sentinel pair id (= T·k), so every
M-block of ``BLOCK_M`` sorted rows belongs to exactly one expert (``block_expert``; -1 past the last block).

* `count_kernel` / `place_kernel` — the alignment itself: a per-chunk expert histogram, then each pair's
  destination = its expert's padded start + the pairs of that expert in earlier chunks + its rank in its chunk.
  Token-parallel (one program per chunk of pairs), no host sync.
* `grouped_gemm_kernel` — one M-block × one N-tile per program (or, persistent, a few programs looping over
  the tiles): rows are *gathered* from token order
  (``row = pair // k``) or read from the padded layout, multiplied by the block's expert weight, and the
  epilogue adds the bias, applies (or differentiates) the activation, dots the tile with a saved operand (for
  the routing-weight gradient), scales by the routing weight, and stores to the padded layout, or scatters to
  token order (plain store when k = 1, fp32 atomic add when k > 1).
* `grouped_wgrad_kernel` — ``dW_e = Σ_rows dYᵀ·A``: each program owns one (N, K) tile of one expert's weight
  and that expert's M-blocks (or one split of them, when there are too few tiles to fill the GPU), in one
  pipelined reduction loop with nothing else in it (the bias gradient is a separate segmented sum). Unsplit,
  the tile is stored straight in the weight's dtype; split, the parts add into a zeroed fp32 buffer.
  ``dY`` comes in the padded layout (zero in padding rows), so there is no gather or scaling in the loop.

``UPCAST_DOT`` is for triton's CPU interpreter only, whose dot is a numpy matmul and has no bfloat16: there
the operands are upcast to fp32 first; compiled kernels feed bf16 straight to the tensor cores.

All row offsets are 64-bit; every tail (rows, N, K) is masked. Token and block counts are not specialised on
(``do_not_specialize``), so a new token count reuses the compiled kernels.
"""

from __future__ import annotations

import triton
import triton.language as tl

from cmoe.kernels.availability import interpreting

# triton decides at decoration time whether a kernel is compiled or interpreted: remember which it was.
INTERPRETED = interpreting()

ACT_IDS = {"identity": 0, "gelu": 1, "gelu_tanh": 2, "relu": 3, "silu": 4}

OUT_PADDED, OUT_TOKEN_STORE, OUT_TOKEN_ATOMIC = 0, 1, 2
DOT_NONE, DOT_GATHERED, DOT_PADDED = 0, 1, 2


@triton.jit
def _sigmoid(z):
    return 1.0 / (1.0 + tl.exp(-z))


@triton.jit
def _activation(z, ACT: tl.constexpr):
    if ACT == 1:
        return 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    elif ACT == 2:
        inner = 0.7978845608028654 * (z + 0.044715 * z * z * z)
        return 0.5 * z * (2.0 * _sigmoid(2.0 * inner))
    elif ACT == 3:
        return tl.maximum(z, 0.0)
    elif ACT == 4:
        return z * _sigmoid(z)
    else:
        return z


@triton.jit
def _activation_grad(z, ACT: tl.constexpr):
    if ACT == 1:
        cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
        return cdf + z * 0.3989422804014327 * tl.exp(-0.5 * z * z)
    elif ACT == 2:
        inner = 0.7978845608028654 * (z + 0.044715 * z * z * z)
        t = 2.0 * _sigmoid(2.0 * inner) - 1.0
        return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * z * z)
    elif ACT == 3:
        return tl.where(z > 0.0, 1.0, 0.0)
    elif ACT == 4:
        s = _sigmoid(z)
        return s * (1.0 + z * (1.0 - s))
    else:
        return tl.full(z.shape, 1.0, tl.float32)


@triton.jit
def _mma(a, b, acc, PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """``acc + a @ b``: in IEEE fp32 from upcast operands (`UPCAST_DOT`), else in `PRECISION` into acc's dtype."""
    if UPCAST_DOT:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=acc.dtype)
    return out


@triton.jit
def _grouped_tile(pid, num_rows, num_cols, GROUP: tl.constexpr):
    """Program `pid`'s (row, column) tile, rows taken GROUP at a time so concurrent programs share operands."""
    num_pid_in_group = GROUP * num_cols
    first_row = (pid // num_pid_in_group) * GROUP
    group_size = tl.minimum(num_rows - first_row, GROUP)
    return first_row + (pid % num_pid_in_group) % group_size, (pid % num_pid_in_group) // group_size


@triton.jit(do_not_specialize=["num_pairs"])
def count_kernel(index_ptr, chunk_counts_ptr, num_pairs, num_experts,
                 BLOCK: tl.constexpr, E_POW2: tl.constexpr):
    """``chunk_counts[c, e]`` = how many of chunk c's pairs go to expert e."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    expert = tl.load(index_ptr + offs, mask=offs < num_pairs, other=-1).to(tl.int32)
    experts = tl.arange(0, E_POW2)
    onehot = (expert[:, None] == experts[None, :]).to(tl.int32)
    tl.store(chunk_counts_ptr + pid.to(tl.int64) * num_experts + experts, tl.sum(onehot, axis=0),
             mask=experts < num_experts)


@triton.jit(do_not_specialize=["num_pairs"])
def place_kernel(index_ptr, chunk_base_ptr, sorted_pair_ptr, num_pairs, num_experts,
                 BLOCK: tl.constexpr, E_POW2: tl.constexpr):
    """``sorted_pair[chunk_base[c, e] + rank of the pair among chunk c's pairs of e] = pair`` (stable order)."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < num_pairs
    expert = tl.load(index_ptr + offs, mask=mask, other=-1).to(tl.int32)
    onehot = (expert[:, None] == tl.arange(0, E_POW2)[None, :]).to(tl.int32)
    rank = tl.sum((tl.cumsum(onehot, axis=0) - onehot) * onehot, axis=1)
    base = tl.load(chunk_base_ptr + pid.to(tl.int64) * num_experts + expert, mask=mask, other=0)
    tl.store(sorted_pair_ptr + base + rank, offs.to(tl.int32), mask=mask)


@triton.jit(do_not_specialize=["num_pairs", "num_blocks", "num_tiles"])
def grouped_gemm_kernel(
    a_ptr, b_ptr, bias_ptr, out_ptr, preact_ptr, dot_src_ptr, dot_out_ptr, act_src_ptr, route_w_ptr,
    sorted_pair_ptr, block_expert_ptr,
    num_pairs, top_k, N, K, num_blocks, num_experts, num_tiles,
    stride_am, stride_be, stride_bk, stride_bn, stride_bias_e, stride_om, stride_pm, stride_dm, stride_zm,
    A_GATHER: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, STORE_PREACT: tl.constexpr,
    DOT_SRC: tl.constexpr, ACT_GRAD: tl.constexpr, SCALE_BY_WEIGHT: tl.constexpr, OUT_MODE: tl.constexpr,
    PRECISION: tl.constexpr, ACC_F64: tl.constexpr, UPCAST_DOT: tl.constexpr, B_DESC: tl.constexpr,
    PERSISTENT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """``out[rows] (op)= epilogue(A[rows] @ B[expert])`` for M-block × N-tile tiles (see module docstring):
    one tile per program, or with ``PERSISTENT`` a grid of about one program per SM, each looping over the
    tiles ``pid, pid + programs, ...`` in the same grouped order (`num_tiles` = blocks × N-tiles).

    ``B_DESC`` loads the expert weights through a tensor descriptor (TMA on Hopper) instead of pointer
    arithmetic: 1 when B is stored ``[E, K, N]`` with N contiguous (``stride_bn == 1``), 2 when stored
    ``[E, N, K]`` with K contiguous (``stride_bk == 1``; the tile is transposed after the load). Out-of-range
    rows and columns read as zero, as the masked loads do. ``B_DESC`` and ``PERSISTENT`` are tuning candidates,
    measured against the plain launch on the GPU."""
    if PERSISTENT:
        for tile in range(tl.program_id(0), num_tiles, tl.num_programs(0)):
            _gemm_tile(tile, a_ptr, b_ptr, bias_ptr, out_ptr, preact_ptr, dot_src_ptr, dot_out_ptr, act_src_ptr,
                       route_w_ptr, sorted_pair_ptr, block_expert_ptr, num_pairs, top_k, N, K, num_blocks,
                       num_experts, stride_am, stride_be, stride_bk, stride_bn, stride_bias_e, stride_om,
                       stride_pm, stride_dm, stride_zm, A_GATHER, HAS_BIAS, ACT, STORE_PREACT, DOT_SRC, ACT_GRAD,
                       SCALE_BY_WEIGHT, OUT_MODE, PRECISION, ACC_F64, UPCAST_DOT, B_DESC, BLOCK_M, BLOCK_N,
                       BLOCK_K, GROUP_M)
    else:
        _gemm_tile(tl.program_id(0), a_ptr, b_ptr, bias_ptr, out_ptr, preact_ptr, dot_src_ptr, dot_out_ptr,
                   act_src_ptr, route_w_ptr, sorted_pair_ptr, block_expert_ptr, num_pairs, top_k, N, K, num_blocks,
                   num_experts, stride_am, stride_be, stride_bk, stride_bn, stride_bias_e, stride_om, stride_pm,
                   stride_dm, stride_zm, A_GATHER, HAS_BIAS, ACT, STORE_PREACT, DOT_SRC, ACT_GRAD, SCALE_BY_WEIGHT,
                   OUT_MODE, PRECISION, ACC_F64, UPCAST_DOT, B_DESC, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)


@triton.jit
def _gemm_tile(
    tile, a_ptr, b_ptr, bias_ptr, out_ptr, preact_ptr, dot_src_ptr, dot_out_ptr, act_src_ptr, route_w_ptr,
    sorted_pair_ptr, block_expert_ptr,
    num_pairs, top_k, N, K, num_blocks, num_experts,
    stride_am, stride_be, stride_bk, stride_bn, stride_bias_e, stride_om, stride_pm, stride_dm, stride_zm,
    A_GATHER: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, STORE_PREACT: tl.constexpr,
    DOT_SRC: tl.constexpr, ACT_GRAD: tl.constexpr, SCALE_BY_WEIGHT: tl.constexpr, OUT_MODE: tl.constexpr,
    PRECISION: tl.constexpr, ACC_F64: tl.constexpr, UPCAST_DOT: tl.constexpr, B_DESC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """One M-block × N-tile of `grouped_gemm_kernel` (its arguments; `tile` in the grouped order)."""
    pid_m, pid_n = _grouped_tile(tile, num_blocks, tl.cdiv(N, BLOCK_N), GROUP_M)

    expert = tl.load(block_expert_ptr + pid_m)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    if expert < 0:  # a block past the used ones: padded outputs get zeros (never garbage), nothing else to do
        if OUT_MODE == 0:
            zeros = tl.zeros((BLOCK_M, BLOCK_N), dtype=out_ptr.dtype.element_ty)
            tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], zeros, mask=n_mask[None, :])
            if STORE_PREACT:
                tl.store(preact_ptr + offs_m[:, None] * stride_pm + offs_n[None, :],
                         zeros.to(preact_ptr.dtype.element_ty), mask=n_mask[None, :])
    else:
        _gemm_used_tile(expert.to(tl.int64), pid_m, pid_n, offs_m, offs_n, n_mask, a_ptr, b_ptr, bias_ptr,
                        out_ptr, preact_ptr, dot_src_ptr, dot_out_ptr, act_src_ptr, route_w_ptr, sorted_pair_ptr,
                        num_pairs, top_k, N, K, num_blocks, num_experts, stride_am, stride_be, stride_bk,
                        stride_bn, stride_bias_e, stride_om, stride_pm, stride_dm, stride_zm, A_GATHER, HAS_BIAS,
                        ACT, STORE_PREACT, DOT_SRC, ACT_GRAD, SCALE_BY_WEIGHT, OUT_MODE, PRECISION, ACC_F64,
                        UPCAST_DOT, B_DESC, BLOCK_M, BLOCK_N, BLOCK_K)


@triton.jit
def _gemm_used_tile(
    expert, pid_m, pid_n, offs_m, offs_n, n_mask, a_ptr, b_ptr, bias_ptr, out_ptr, preact_ptr, dot_src_ptr,
    dot_out_ptr, act_src_ptr, route_w_ptr, sorted_pair_ptr,
    num_pairs, top_k, N, K, num_blocks, num_experts,
    stride_am, stride_be, stride_bk, stride_bn, stride_bias_e, stride_om, stride_pm, stride_dm, stride_zm,
    A_GATHER: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, STORE_PREACT: tl.constexpr,
    DOT_SRC: tl.constexpr, ACT_GRAD: tl.constexpr, SCALE_BY_WEIGHT: tl.constexpr, OUT_MODE: tl.constexpr,
    PRECISION: tl.constexpr, ACC_F64: tl.constexpr, UPCAST_DOT: tl.constexpr, B_DESC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """The GEMM and epilogue of a tile whose block belongs to `expert` (see `grouped_gemm_kernel`)."""
    pair = tl.load(sorted_pair_ptr + offs_m).to(tl.int64)
    valid = pair < num_pairs
    token = pair // top_k
    if A_GATHER:
        a_rows = token
    else:
        a_rows = offs_m
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_rows[:, None] * stride_am + offs_k[None, :]
    b_ptrs = b_ptr + expert * stride_be + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn
    if B_DESC == 1:
        b_desc = tl.make_tensor_descriptor(b_ptr, shape=[num_experts, K, N], strides=[stride_be, stride_bk, 1],
                                           block_shape=[1, BLOCK_K, BLOCK_N])
    elif B_DESC == 2:
        b_desc = tl.make_tensor_descriptor(b_ptr, shape=[num_experts, N, K], strides=[stride_be, stride_bn, 1],
                                           block_shape=[1, BLOCK_N, BLOCK_K])

    if ACC_F64:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_dtype = acc.dtype
    for k0 in range(0, K, BLOCK_K):
        k_mask = offs_k < K - k0
        a = tl.load(a_ptrs, mask=valid[:, None] & k_mask[None, :], other=0.0)
        if B_DESC == 1:
            b = b_desc.load([expert.to(tl.int32), k0, pid_n * BLOCK_N]).reshape(BLOCK_K, BLOCK_N)
        elif B_DESC == 2:
            b = tl.trans(b_desc.load([expert.to(tl.int32), pid_n * BLOCK_N, k0]).reshape(BLOCK_N, BLOCK_K))
        else:
            b = tl.load(b_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = _mma(a, b, acc, PRECISION, UPCAST_DOT)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * stride_bk

    tile_mask = valid[:, None] & n_mask[None, :]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + expert * stride_bias_e + offs_n, mask=n_mask, other=0.0)
        acc += bias[None, :].to(acc_dtype)
    if DOT_SRC != 0:
        if DOT_SRC == 1:
            d_rows = token
        else:
            d_rows = offs_m
        d = tl.load(dot_src_ptr + d_rows[:, None] * stride_dm + offs_n[None, :], mask=tile_mask, other=0.0)
        partial = tl.sum(acc * d.to(acc_dtype), axis=1)
        tl.store(dot_out_ptr + pid_n.to(tl.int64) * num_blocks * BLOCK_M + offs_m, partial)
    if STORE_PREACT:
        tl.store(preact_ptr + offs_m[:, None] * stride_pm + offs_n[None, :],
                 acc.to(preact_ptr.dtype.element_ty), mask=n_mask[None, :])
    if ACT != 0:
        acc = _activation(acc, ACT)
    if ACT_GRAD != 0:
        z = tl.load(act_src_ptr + offs_m[:, None] * stride_zm + offs_n[None, :], mask=tile_mask, other=0.0)
        acc = acc * _activation_grad(z.to(acc_dtype), ACT_GRAD)
    if SCALE_BY_WEIGHT:
        w = tl.load(route_w_ptr + pair, mask=valid, other=0.0).to(acc_dtype)
        acc = acc * w[:, None]
    acc = tl.where(valid[:, None], acc, 0.0)
    if OUT_MODE == 0:
        tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :],
                 acc.to(out_ptr.dtype.element_ty), mask=n_mask[None, :])
    elif OUT_MODE == 1:
        tl.store(out_ptr + token[:, None] * stride_om + offs_n[None, :],
                 acc.to(out_ptr.dtype.element_ty), mask=tile_mask)
    else:
        tl.atomic_add(out_ptr + token[:, None] * stride_om + offs_n[None, :], acc, mask=tile_mask)


@triton.jit(do_not_specialize=["num_pairs", "blocks_per_split"])
def grouped_wgrad_kernel(
    dy_ptr, a_ptr, dw_ptr, sorted_pair_ptr, block_offsets_ptr,
    num_pairs, top_k, N, K, blocks_per_split,
    stride_dym, stride_am, stride_dwe, stride_dwn,
    A_GATHER: tl.constexpr, ATOMIC: tl.constexpr, PRECISION: tl.constexpr,
    ACC_F64: tl.constexpr, UPCAST_DOT: tl.constexpr, STAGE_ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_N: tl.constexpr,
):
    """``dW[e] (+)= Σ dY[rows]ᵀ·A[rows]`` over one expert's M-blocks (or one split of them) for one (N, K) tile.

    Grid: (tiles, experts, splits). ``dY`` is in the padded layout (zero in padding rows); ``A`` rows are
    gathered from token order (the first layer's input x) or read from the padded layout. One split: the tile
    is stored (zeros for an expert without rows) in dW's dtype; several: added into a zeroed fp32 buffer.

    ``STAGE_ROWS`` (gathered A only) software-pipelines the gather by hand: the next M-block's pair indices and
    its gathered rows are loaded before this block's dot, so the dependent index → row loads of one block can
    overlap the previous block's MMA. Whether that beats what the compiler's own pipelining does with the
    indirect load is measured, not assumed: it is a tuning candidate next to the plain loop.
    """
    pid_n, pid_k = _grouped_tile(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(K, BLOCK_K), GROUP_N)
    expert = tl.program_id(1)
    split = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    n_mask = offs_n < N
    k_mask = offs_k < K
    lo = tl.load(block_offsets_ptr + expert) + split * blocks_per_split
    hi = tl.minimum(tl.load(block_offsets_ptr + expert + 1), lo + blocks_per_split)
    if ACC_F64:
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    if A_GATHER and STAGE_ROWS:
        offs_m = (lo * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        pair = tl.load(sorted_pair_ptr + offs_m, mask=(offs_m * 0 + lo) < hi, other=num_pairs).to(tl.int64)
        a = tl.load(a_ptr + (pair // top_k)[:, None] * stride_am + offs_k[None, :],
                    mask=(pair < num_pairs)[:, None] & k_mask[None, :], other=0.0)
        for block in range(lo, hi):
            next_m = offs_m + BLOCK_M
            next_pair = tl.load(sorted_pair_ptr + next_m, mask=(next_m * 0 + block + 1) < hi,
                                other=num_pairs).to(tl.int64)
            next_a = tl.load(a_ptr + (next_pair // top_k)[:, None] * stride_am + offs_k[None, :],
                             mask=(next_pair < num_pairs)[:, None] & k_mask[None, :], other=0.0)
            dy_t = tl.load(dy_ptr + offs_m[None, :] * stride_dym + offs_n[:, None], mask=n_mask[:, None],
                           other=0.0)
            acc = _mma(dy_t, a, acc, PRECISION, UPCAST_DOT)
            offs_m, a = next_m, next_a
    else:
        for block in range(lo, hi):
            offs_m = (block * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
            dy_t = tl.load(dy_ptr + offs_m[None, :] * stride_dym + offs_n[:, None], mask=n_mask[:, None],
                           other=0.0)
            if A_GATHER:
                pair = tl.load(sorted_pair_ptr + offs_m).to(tl.int64)
                valid = pair < num_pairs
                a = tl.load(a_ptr + (pair // top_k)[:, None] * stride_am + offs_k[None, :],
                            mask=valid[:, None] & k_mask[None, :], other=0.0)
            else:
                a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_k[None, :], mask=k_mask[None, :],
                            other=0.0)
            acc = _mma(dy_t, a, acc, PRECISION, UPCAST_DOT)
    dw_ptrs = dw_ptr + expert.to(tl.int64) * stride_dwe + offs_n[:, None].to(tl.int64) * stride_dwn + offs_k[None, :]
    tile_mask = n_mask[:, None] & k_mask[None, :]
    if ATOMIC:
        if hi > lo:
            tl.atomic_add(dw_ptrs, acc, mask=tile_mask)
    else:
        tl.store(dw_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=tile_mask)
