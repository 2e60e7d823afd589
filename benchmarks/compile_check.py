"""Compile every Triton kernel variant for a GPU architecture on a machine without one, and count what the
compiled code uses: ``wgmma`` (Hopper's asynchronous tensor-core MMA), ``cp.async`` (the software-pipelined
pointer loads), ``cp.async.bulk.tensor`` (TMA) and the shared memory each launch needs.

``python -m cmoe.benchmarks.compile_check [--arch 90] [--json out.json]`` (with ``TRITON_INTERPRET`` unset: the
kernels must be decorated for compilation). Triton's own compiler and ``ptxas`` (shipped in the triton wheel)
do the work, ahead of time (``triton.compile`` of an ``ASTSource``), so a variant that would fail to compile
on the GPU machine fails here, and a variant whose loads are not pipelined shows it, before GPU time is
spent. The launches are described as the runtime would specialise them on the benchmark's shapes: bf16
operands, every pointer and stride divisible by 16 (widths like 1408, 4096, 5632), tiles of the first tuning
candidate. What this cannot say is how fast anything runs; and the GPU machine's triton may be older than
this one's.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

INSTRUCTIONS = {"wgmma": r"\bwgmma\.mma_async", "mma_sync": r"\bmma\.sync", "cp_async": r"\bcp\.async\.c[ag]\b",
                "tma_load": r"\bcp\.async\.bulk\.tensor", "atomic_add": r"\b(red|atom)\.global[.\w]*\.add"}


@dataclass
class Compiled:
    """One compiled variant: its name, the instruction counts (`INSTRUCTIONS`) and shared memory in bytes."""

    name: str
    shared_bytes: int
    counts: dict[str, int]


def _signature(kernel, constexprs: dict[str, Any], pointer_types: dict[str, str]) -> tuple[dict, dict, dict]:
    names = list(inspect.signature(kernel.fn).parameters)
    signature, attrs = {}, {}
    for i, name in enumerate(names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = pointer_types.get(name, "*bf16")
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "i32"
            if name.startswith("stride") or name in ("N", "K"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    missing = sorted(set(constexprs) - set(names))
    if missing:
        raise ValueError(f"{kernel.fn.__name__} has no parameters {missing}")
    return signature, {(names.index(k),): v for k, v in constexprs.items()}, attrs


def compile_variant(name: str, kernel, constexprs: dict[str, Any], pointer_types: dict[str, str], arch: int,
                    num_warps: int, num_stages: int) -> Compiled:
    """Compile `kernel` with `constexprs` for ``sm_<arch>`` and count its instructions."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constants, attrs = _signature(kernel, constexprs, pointer_types)
    source = ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    ptx = compiled.asm["ptx"]
    counts = {key: len(re.findall(pattern, ptx)) for key, pattern in INSTRUCTIONS.items()}
    return Compiled(name, int(compiled.metadata.shared), counts)


def variants(arch: int = 90) -> list[Compiled]:
    """Every kernel of the ``triton`` backend, in the variants the benchmark's launches and the tuner use."""
    from cmoe.kernels import triton_kernels as kernels

    gemm = dict(A_GATHER=True, HAS_BIAS=True, ACT=kernels.ACT_IDS["gelu"], STORE_PREACT=True, DOT_SRC=0,
                ACT_GRAD=0, SCALE_BY_WEIGHT=False, OUT_MODE=kernels.OUT_PADDED, PRECISION="tf32", ACC_F64=False,
                UPCAST_DOT=False, B_DESC=0, PERSISTENT=False, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8)
    index = {"sorted_pair_ptr": "*i32", "block_expert_ptr": "*i32", "dot_out_ptr": "*fp32"}
    second = dict(gemm, A_GATHER=False, HAS_BIAS=True, ACT=0, STORE_PREACT=False, SCALE_BY_WEIGHT=True,
                  OUT_MODE=kernels.OUT_TOKEN_ATOMIC)
    input_grad = dict(gemm, A_GATHER=False, HAS_BIAS=False, ACT=0, STORE_PREACT=False,
                      DOT_SRC=kernels.DOT_PADDED, ACT_GRAD=kernels.ACT_IDS["gelu"], B_DESC=1)
    wgrad = dict(A_GATHER=True, ATOMIC=False, PRECISION="tf32", ACC_F64=False, UPCAST_DOT=False, STAGE_ROWS=False,
                 BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_N=8)
    wgrad_types = {"sorted_pair_ptr": "*i32", "block_offsets_ptr": "*i32"}
    align_types = {"index_ptr": "*i64", "chunk_counts_ptr": "*i32", "chunk_base_ptr": "*i32",
                   "sorted_pair_ptr": "*i32"}
    plan = [
        ("forward layer 1 (gathered x, bias, GELU)", kernels.grouped_gemm_kernel, gemm, index, 8, 3),
        ("forward layer 1, weights through TMA (tma_weight)", kernels.grouped_gemm_kernel, dict(gemm, B_DESC=2),
         index, 8, 3),
        ("forward layer 1, persistent", kernels.grouped_gemm_kernel, dict(gemm, PERSISTENT=True), index, 8, 3),
        ("forward layer 2 (routing weight, fp32 atomic scatter)", kernels.grouped_gemm_kernel, second,
         {**index, "out_ptr": "*fp32"}, 8, 3),
        ("input gradient (TMA weights, GELU', routing-weight dot)", kernels.grouped_gemm_kernel, input_grad, index,
         8, 3),
        ("weight gradient over gathered x", kernels.grouped_wgrad_kernel, wgrad, wgrad_types, 8, 3),
        ("weight gradient over gathered x, staged rows", kernels.grouped_wgrad_kernel,
         dict(wgrad, STAGE_ROWS=True), wgrad_types, 8, 3),
        ("alignment: count", kernels.count_kernel, dict(BLOCK=256, E_POW2=8), align_types, 4, 1),
        ("alignment: place", kernels.place_kernel, dict(BLOCK=256, E_POW2=8), align_types, 4, 1),
    ]
    return [compile_variant(name, kernel, constexprs, types, arch, warps, stages)
            for name, kernel, constexprs, types, warps, stages in plan]


def table(results: list[Compiled], arch: int) -> str:
    lines = [f"| variant (bf16, sm_{arch}) | shared KiB | " + " | ".join(INSTRUCTIONS) + " |",
             "|---|---:|" + "---:|" * len(INSTRUCTIONS)]
    for result in results:
        lines.append(f"| {result.name} | {result.shared_bytes / 1024:.0f} | "
                     + " | ".join(str(result.counts[key]) for key in INSTRUCTIONS) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability × 10 (90: Hopper)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("error: unset TRITON_INTERPRET: interpreted kernels cannot be compiled", file=sys.stderr)
        return 2
    results = variants(args.arch)
    print(table(results, args.arch))
    if args.json:
        from cmoe.checkpointing import atomic_write

        text = json.dumps([asdict(r) for r in results], indent=1)
        atomic_write(args.json, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
