#!/usr/bin/env bash
# Wheels of the peer MoE kernels that can travel to the GPU machine, which reaches no network: run here, then
# name the folder in the device call's `carry`; `gpu_session.sh` installs what it finds there (PEER_WHEELS).
#
#   bash benchmarks/peer_wheels.sh [DIR] [SCATTERMOE_SRC]    # DIR defaults to .whl (git-ignored)
#
# * liger-kernel 0.8.5 (fused MoE, pure Python + Triton): downloaded from the package index.
# * scattermoe 0.3.0 (pure Python + Triton; not on the index): built from a local clone of
#   github.com/shawntan/scattermoe given as SCATTERMOE_SRC; skipped with a note when none is given.
# Not carried, and why (the benchmark reports them as not installed):
# * sonic-moe: its CUTLASS DSL runtime (nvidia-cutlass-dsl-libs-base 4.4.2) is one 74 MB wheel, over the
#   64 MiB one device call carries, and sonic-moe 0.1.2 pins torch<=2.9.1 (the GPU machine has 2.11).
# * grouped_gemm (MegaBlocks): a source distribution only; building it needs the CUTLASS tree and minutes of
#   nvcc on the GPU machine, more than a 15-minute device budget spares.
set -euo pipefail
dir=${1:-.whl}
src=${2:-}
py=${PYTHON:-python3}
mkdir -p "$dir"
"$py" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform any --platform manylinux_2_28_x86_64 -d "$dir" "liger-kernel==0.8.5"
if [ -n "$src" ]; then
  "$py" -m pip wheel --quiet --no-deps --no-build-isolation -w "$dir" "$src"
else
  echo "note: scattermoe skipped: pass a local clone of github.com/shawntan/scattermoe (release 0.3.0) as SCATTERMOE_SRC"
fi
ls -l "$dir"
