"""Kernel-level probe of the ``triton`` backend on the headline case (CUDA only): where the time goes.

``python -m cmoe.benchmarks.probe_triton [SECTION ...]`` with sections ``ceilings``, ``e2e``, ``isolated``,
``breakdown``, ``sweep_forward``, ``sweep_backward``, ``wgrad`` (default: all). It prints, and writes to
``$OUT/probe.log`` (default: the current directory):

* the machine's dense bf16 matmul rate; end-to-end times of triton / sorted / torch_grouped_mm / roofline;
* each GEMM alone (forward and weight gradient, padded and gathered operands) against ``torch._grouped_mm``
  on the same padded operands; a torch.profiler per-kernel breakdown of one fwd+bwd;
* block-configuration sweeps per kernel role (pinned with `cmoe.kernels.pin_config`).

The numbers quoted in RESULTS.md's note about individual kernels come from this script.
"""
import os
import sys
import time
import traceback

import torch

if not torch.cuda.is_available():
    sys.exit("cmoe.benchmarks.probe_triton times the fused kernels on a CUDA GPU; none is available here")

import triton  # noqa: E402
import triton.testing  # noqa: E402

from cmoe.benchmarks.cases import Case, build_workload, make_callable  # noqa: E402
from cmoe.kernels import ops, tuning  # noqa: E402

OUT = os.environ.get("OUT", ".")
CASE = Case(16384, 5632, 4096, 8, 2, "mlp", dtype=torch.bfloat16)
log = open(os.path.join(OUT, "probe.log"), "w")


def say(*a):
    s = " ".join(str(x) for x in a)
    print(s, flush=True)
    log.write(s + "\n")
    log.flush()


def bench(fn, rep=150):
    return triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median")


def section(name):
    def deco(f):
        def run(*a, **k):
            t0 = time.time()
            say(f"\n=== {name}")
            try:
                f(*a, **k)
            except Exception:
                say(traceback.format_exc())
            say(f"--- {name}: {time.time() - t0:.0f}s")
        return run
    return deco


w = build_workload(CASE, "cuda")


@section("ceilings")
def ceilings():
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = bench(lambda: a @ a)
    say(f"dense 8192^3 bf16: {2 * 8192 ** 3 / ms / 1e9:.0f} TFLOP/s")
    rows = torch.randn(32768, 5632, device="cuda", dtype=torch.bfloat16)
    w1 = torch.randn(5632, 4096, device="cuda", dtype=torch.bfloat16)
    ms = bench(lambda: rows @ w1)
    say(f"roofline layer1 32768x5632x4096: {ms:.3f} ms {2 * 32768 * 5632 * 4096 / ms / 1e9:.0f} TFLOP/s")


@section("end-to-end fwd / fwd+bwd (tuned)")
def e2e():
    for name in ("triton", "sorted", "torch_grouped_mm", "dense_matmul_roofline"):
        f = make_callable(w, name, "forward")
        fb = make_callable(w, name, "forward_backward")
        f(); fb()
        say(f"{name:24s} fwd {bench(f):7.3f} ms   fwd+bwd {bench(fb):7.3f} ms")


@section("profiler breakdown fwd+bwd")
def breakdown():
    from torch.profiler import ProfilerActivity, profile
    for name in ("triton", "sorted", "torch_grouped_mm"):
        fb = make_callable(w, name, "forward_backward")
        fb(); fb()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                fb()
            torch.cuda.synchronize()
        say(f"\n-- {name} (3 iterations)")
        say(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=70))


FWD = [(128, 64, 8, 3), (256, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 4), (128, 64, 4, 4), (256, 64, 8, 4),
       (128, 64, 8, 4), (128, 128, 4, 3), (256, 128, 8, 2)]
WG = [(128, 128, 8, 3), (128, 256, 8, 3), (256, 128, 8, 3), (128, 64, 4, 4), (128, 128, 4, 4), (128, 128, 8, 4),
      (64, 128, 4, 4), (256, 64, 8, 3)]


def time_pinned(label: str, role: str, tile: tuple[int, int, int, int], fn, **variant: int) -> None:
    """Pin `tile` (block_n, block_k, warps, stages) and `variant` (e.g. ``tma_weight=1``) for `role`, time `fn`,
    report; a tile that fails is reported."""
    n, k, warps, stages = tile
    tuning.pin_config(role, block_n=n, block_k=k, num_warps=warps, num_stages=stages, **variant)
    name = f"{label} n={n} k={k} w={warps} s={stages}" + "".join(f" {key}={v}" for key, v in variant.items())
    try:
        fn()
        say(f"{name}: {bench(fn):.3f} ms")
    except Exception as exc:
        say(f"{name}: FAILED {type(exc).__name__}: {str(exc)[:120]}")


@section("forward-role sweep (fwd only), block_m 128 and 64")
def sweep_forward():
    f = make_callable(w, "triton", "forward")
    for bm in (128, 64):
        tuning.pin_config(None, block_m=bm)
        for tile in FWD:
            time_pinned(f"fwd bm={bm}", "forward", tile, f)
        for tile in FWD[:3]:  # the same tiles with the weights through tensor descriptors, then persistent
            time_pinned(f"fwd bm={bm}", "forward", tile, f, tma_weight=1)
            time_pinned(f"fwd bm={bm}", "forward", tile, f, persistent=1)
    tuning.pin_config(None)
    tuning.pin_config("forward")


@section("weight_grad / backward_input sweep (fwd+bwd)")
def sweep_backward():
    fb = make_callable(w, "triton", "forward_backward")
    for role, configs in (("weight_grad", WG), ("backward_input", FWD)):
        for tile in configs:
            time_pinned(f"fwd+bwd {role}", role, tile, fb)
        tuning.pin_config(role)


@section("isolated GEMMs: triton kernel vs torch._grouped_mm on the padded layout")
def isolated():
    E, bm = CASE.num_experts, 128
    al = ops.align(w.index, E, bm)
    P = al.padded_rows
    h = torch.randn(P, 4096, device="cuda", dtype=torch.bfloat16)
    w2 = torch.randn(E, 4096, 4096, device="cuda", dtype=torch.bfloat16) / 64
    out = torch.empty(P, 4096, device="cuda", dtype=torch.bfloat16)
    offs = (al.block_offsets[1:].to(torch.int64) * bm).to(torch.int32)
    routed = 2 * CASE.tokens * CASE.top_k * 4096 * 4096
    ms = bench(lambda: ops.gemm(al, h, w2, transpose_weight=True, a_gather=False, out=out, out_mode=ops.OUT_PADDED))
    say(f"triton fwd gemm padded P={P} 4096x4096: {ms:.3f} ms {routed / ms / 1e9:.0f} TFLOP/s (routed rows)")
    try:
        ms = bench(lambda: torch._grouped_mm(h, w2.transpose(1, 2), offs=offs))
        say(f"torch._grouped_mm fwd same: {ms:.3f} ms {routed / ms / 1e9:.0f} TFLOP/s")
    except Exception as exc:
        say(f"grouped_mm fwd failed: {exc}")
    dy = torch.randn(P, 4096, device="cuda", dtype=torch.bfloat16)
    ms = bench(lambda: ops.weight_grad(al, dy, h, a_gather=False, num_experts=E, has_bias=True))
    say(f"triton wgrad padded: {ms:.3f} ms {routed / ms / 1e9:.0f} TFLOP/s")
    try:
        ms = bench(lambda: torch._grouped_mm(dy.t(), h, offs=offs))
        say(f"torch._grouped_mm wgrad same: {ms:.3f} ms {routed / ms / 1e9:.0f} TFLOP/s")
        ref = torch._grouped_mm(dy.t(), h, offs=offs).float()
        got, _ = ops.weight_grad(al, dy, h, a_gather=False, num_experts=E, has_bias=False)
        say(f"wgrad agreement rel err {((got - ref).norm() / ref.norm()).item():.2e}")
    except Exception as exc:
        say(f"grouped_mm wgrad failed: {exc}")
    x = w.x.detach()
    w1 = torch.randn(E, 4096, 5632, device="cuda", dtype=torch.bfloat16) / 75
    routed1 = 2 * CASE.tokens * CASE.top_k * 5632 * 4096
    ms = bench(lambda: ops.gemm(al, x, w1, transpose_weight=True, a_gather=True, out=out, out_mode=ops.OUT_PADDED))
    say(f"triton fwd gemm gathered x 5632->4096: {ms:.3f} ms {routed1 / ms / 1e9:.0f} TFLOP/s")
    xp = x.index_select(0, torch.clamp(al.sorted_pair.long() // 2, max=x.shape[0] - 1))
    ms = bench(lambda: ops.gemm(al, xp, w1, transpose_weight=True, a_gather=False, out=out, out_mode=ops.OUT_PADDED))
    say(f"triton fwd gemm contiguous copy 5632->4096: {ms:.3f} ms {routed1 / ms / 1e9:.0f} TFLOP/s")
    ms = bench(lambda: ops.weight_grad(al, dy, x, a_gather=True, num_experts=E, has_bias=True))
    say(f"triton wgrad gathered x: {ms:.3f} ms {routed1 / ms / 1e9:.0f} TFLOP/s")
    ms = bench(lambda: ops.weight_grad(al, dy, xp, a_gather=False, num_experts=E, has_bias=True))
    say(f"triton wgrad contiguous copy: {ms:.3f} ms {routed1 / ms / 1e9:.0f} TFLOP/s")
    try:
        ms = bench(lambda: torch._grouped_mm(dy.t(), xp, offs=offs))
        say(f"torch._grouped_mm wgrad contiguous copy: {ms:.3f} ms {routed1 / ms / 1e9:.0f} TFLOP/s")
    except Exception as exc:
        say(f"grouped_mm wgrad1 failed: {exc}")
    say("tuned:", {k: v for k, v in tuning.tuned_choices().items()})


@section("new wgrad kernel: variants and tiles vs torch._grouped_mm")
def wgrad():
    E, bm = CASE.num_experts, 128
    al = ops.align(w.index, E, bm)
    P = al.padded_rows
    real = (al.sorted_pair < al.num_pairs).unsqueeze(1)
    h = torch.where(real, torch.randn(P, 4096, device="cuda", dtype=torch.bfloat16), 0)
    dy = torch.where(real, torch.randn(P, 4096, device="cuda", dtype=torch.bfloat16), 0)
    x = w.x.detach()
    offs = (al.block_offsets[1:].to(torch.int64) * bm).to(torch.int32)
    r2 = 2 * CASE.tokens * CASE.top_k * 4096 * 4096
    r1 = 2 * CASE.tokens * CASE.top_k * 5632 * 4096
    ref2 = torch._grouped_mm(dy.t(), h, offs=offs).float()
    say(f"grouped_mm wgrad padded: {bench(lambda: torch._grouped_mm(dy.t(), h, offs=offs)):.3f} ms")
    for n, k, warps, st in [(128, 128, 8, 3), (128, 64, 8, 4), (64, 128, 4, 4), (128, 64, 4, 4),
                            (128, 128, 4, 4), (128, 256, 8, 3)]:
        tuning.pin_config("weight_grad", block_n=n, block_k=k, num_warps=warps, num_stages=st)
        try:
            dw, _ = ops.weight_grad(al, dy, h, a_gather=False, num_experts=E, has_bias=False)
            err = ((dw.float() - ref2).norm() / ref2.norm()).item()
            t2 = bench(lambda: ops.weight_grad(al, dy, h, a_gather=False, num_experts=E, has_bias=False))
            t1 = bench(lambda: ops.weight_grad(al, dy, x, a_gather=True, num_experts=E, has_bias=False))
            tb = bench(lambda: ops.weight_grad(al, dy, h, a_gather=False, num_experts=E, has_bias=True))
            plain1, _ = ops.weight_grad(al, dy, x, a_gather=True, num_experts=E, has_bias=False)
            tuning.pin_config("weight_grad", block_n=n, block_k=k, num_warps=warps, num_stages=st, stage_rows=1)
            staged1, _ = ops.weight_grad(al, dy, x, a_gather=True, num_experts=E, has_bias=False)
            err1 = ((staged1.float() - plain1.float()).norm() / plain1.float().norm()).item()
            ts = bench(lambda: ops.weight_grad(al, dy, x, a_gather=True, num_experts=E, has_bias=False))
            say(f"n={n} k={k} w={warps} s={st}: padded {t2:.3f} ms {r2 / t2 / 1e9:.0f} TF/s "
                f"(err {err:.1e}, +bias {tb:.3f}); gathered x {t1:.3f} ms {r1 / t1 / 1e9:.0f} TF/s; "
                f"staged gather {ts:.3f} ms {r1 / ts / 1e9:.0f} TF/s (vs plain {err1:.1e})")
        except Exception as exc:
            say(f"n={n} k={k} w={warps} s={st}: FAILED {type(exc).__name__}: {str(exc)[:100]}")
    tuning.pin_config("weight_grad")


SECTIONS = ["ceilings", "e2e", "isolated", "breakdown", "sweep_forward", "sweep_backward", "wgrad"]
for name in sys.argv[1:] or SECTIONS:
    if name not in SECTIONS:
        sys.exit(f"unknown section {name!r}; known: {SECTIONS}")
    globals()[name]()
