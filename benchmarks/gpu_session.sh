#!/usr/bin/env bash
# The GPU checks of the dispatch backends, as one command per phase, or all of them in one short call.
#
#   bash benchmarks/gpu_session.sh all [OUT]     # tests, the paper step, the benchmark and a short sweep, one folder
#   bash benchmarks/gpu_session.sh tests [OUT]   # GPU test matrix, tuning candidates, 64-bit case, CUDA graph,
#                                                # grouped_mm and auto on CUDA
#   bash benchmarks/gpu_session.sh sweep [OUT]   # dense-GEMM ceilings, forward/backward tile sweeps, wgrad variants
#   bash benchmarks/gpu_session.sh bench [OUT]   # the benchmark runner (with peers where installed): OUT/RESULTS.md
#   bash benchmarks/gpu_session.sh paper [OUT]   # a few steps of the Uni-Med paper model (random weights)
#   bash benchmarks/gpu_session.sh probe [OUT]   # the whole kernel probe (OUT/probe.log)
#
# Needs CUDA torch, triton and cmoe installed (`pip install -e '.[triton,hf]'`). Peers are optional: wheels in
# PEER_WHEELS (default .whl, made by `benchmarks/peer_wheels.sh`) are installed into a temporary folder on the
# path first, so a machine without network can run them; device.txt names those found. OUT defaults to
# benchmarks/gpu-out. Every phase writes its log to OUT; `all` also writes OUT/phases.txt (phase, exit status,
# seconds) and gives each phase a time limit (TESTS_S, PAPER_S, BENCH_S, SWEEP_S seconds; defaults 180, 120,
# 200, 60: 560 s, inside one device call's 600) so one device call stays short; the phases run most needed
# first, so a cut loses the sweep.
# `all` leaves 8 files in OUT (device.txt, phases.txt, tests.log, paper.log, bench.log, RESULTS.md, sweep.log,
# probe.log), the most one device call brings back. Copy OUT/RESULTS.md over benchmarks/RESULTS.md and write
# its "read this first" note by hand; the paper step's numbers (the JSON at the end of paper.log) go into
# docs/unimed.md.
#
# GPU_SESSION_DRY=1 runs the same script on a CPU machine, to check it before a GPU is booked: tests are only
# collected (plus one quick CPU test file), the sweep reports that it needs CUDA, the paper step runs at toy
# widths on CPU (--dry-run), and the benchmark runs --quick on CPU (BENCH_CASES narrows it, as --cases). PYTHON
# picks the interpreter (default: python).
set -uo pipefail
phase=${1:?usage: gpu_session.sh all|tests|paper|sweep|bench|probe [OUT]}
out=${2:-benchmarks/gpu-out}
py=${PYTHON:-python}
dry=${GPU_SESSION_DRY:-0}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
# The sweep: dense-GEMM ceilings, the forward and backward tile sweeps, then the weight-gradient variants
# (plain vs staged gather, `stage_rows`), last so that a sweep cut by its time limit loses only those.
SWEEP_SECTIONS="ceilings sweep_forward sweep_backward wgrad"
GPU_TESTS="tests/kernels/test_triton_gpu.py tests/kernels/test_no_host_sync.py tests/kernels/test_triton_kernels.py \
tests/kernels/test_dispatch_grouped_mm.py tests/core/test_dispatch_auto.py"

describe_device() {
  if [ "$dry" = 1 ]; then
    "$py" -c "import torch; print('dry run on CPU (GPU_SESSION_DRY=1), torch', torch.__version__)"
  else
    "$py" -c "import torch, triton; print(torch.cuda.get_device_name(), 'torch', torch.__version__, \
'cuda', torch.version.cuda, 'triton', triton.__version__)"
  fi
}

run_tests() {
  if [ "$dry" = 1 ]; then
    # shellcheck disable=SC2086
    "$py" -m pytest --collect-only -q -p no:cacheprovider $GPU_TESTS && \
      "$py" -m pytest -q -p no:cacheprovider tests/core/test_dispatch_auto.py -k "bucket or table_mode"
    return
  fi
  # The first candidate of each class (no tuning) keeps the matrix short; every candidate is still checked by
  # test_every_tuning_candidate_is_correct.
  # shellcheck disable=SC2086
  CMOE_TRITON_AUTOTUNE=0 "$py" -m pytest $GPU_TESTS -q -rs -p no:cacheprovider --durations=10
}

run_sweep() {
  if [ "$dry" = 1 ]; then  # the probe must refuse to run without CUDA, and say so
    # shellcheck disable=SC2086
    OUT="$out" "$py" -m cmoe.benchmarks.probe_triton $SWEEP_SECTIONS
    [ $? = 1 ] && echo "dry run: the sweep needs CUDA (as expected)"
    return
  fi
  # shellcheck disable=SC2086
  OUT="$out" "$py" -m cmoe.benchmarks.probe_triton $SWEEP_SECTIONS
}

run_paper() {
  if [ "$dry" = 1 ]; then
    "$py" -m cmoe.reference_models.unimed.paper.paper_step --dry-run --steps 1
  else
    "$py" -m cmoe.reference_models.unimed.paper.paper_step
  fi
}

run_bench() {
  if [ "$dry" = 1 ]; then
    "$py" -m cmoe.benchmarks.run --quick --device cpu --cases "${BENCH_CASES:-}" --out "$out/RESULTS.md"
  else
    "$py" -m cmoe.benchmarks.run --min-time 0.2 --out "$out/RESULTS.md"
  fi
}

# One phase with a time limit; its status and seconds go to OUT/phases.txt.
timed_phase() {
  local name=$1 limit=$2 started status
  started=$(date +%s)
  timeout --signal=INT --kill-after=20 "$limit" bash "$0" "$name" "$out"
  status=$?
  echo "$name $status $(( $(date +%s) - started ))s" | tee -a "$out/phases.txt"
}

# The carried peer wheels, once per call: the phases `all` starts inherit PYTHONPATH and CMOE_PEERS.
install_peers() {
  local wheels=${PEER_WHEELS:-.whl} target=${TMPDIR:-/tmp}/cmoe-peers
  if ! compgen -G "$wheels/*.whl" > /dev/null; then
    peers_line="peers: as installed (no wheels in $wheels)"
  elif "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$target" \
      "$wheels"/*.whl; then
    export PYTHONPATH="$target${PYTHONPATH:+:$PYTHONPATH}"
    peers_line="peers: installed from $wheels: $(cd "$wheels" && ls -- *.whl | tr '\n' ' ')"
  else
    peers_line="peers: installing the wheels in $wheels failed (see above)"
  fi
}
if [ -z "${CMOE_PEERS:-}" ]; then
  install_peers
  export CMOE_PEERS=$peers_line
fi
{ describe_device && echo "$CMOE_PEERS"; } | tee "$out/device.txt" || exit 1
case "$phase" in
  all)
    : > "$out/phases.txt"
    timed_phase tests "${TESTS_S:-180}"
    timed_phase paper "${PAPER_S:-120}"
    timed_phase bench "${BENCH_S:-200}"
    timed_phase sweep "${SWEEP_S:-60}"
    ! grep -qv " 0 " "$out/phases.txt"
    ;;
  tests)
    run_tests 2>&1 | tee "$out/tests.log"
    ;;
  paper)
    run_paper 2>&1 | tee "$out/paper.log"
    ;;
  sweep)
    run_sweep > "$out/sweep.log" 2>&1
    ;;
  bench)
    run_bench 2>&1 | tee "$out/bench.log"
    ;;
  probe)
    OUT="$out" "$py" -m cmoe.benchmarks.probe_triton > "$out/probe_stdout.log" 2>&1
    ;;
  *)
    echo "unknown phase $phase: expected all, tests, paper, sweep, bench or probe" >&2
    exit 2
    ;;
esac
