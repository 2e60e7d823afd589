#!/usr/bin/env bash
# The GPU checks of the triton backend, as one command per phase (each fits a 10-minute slot on an H100).
#
#   bash benchmarks/gpu_session.sh tests [OUT]   # GPU test matrix, tuning candidates, 64-bit case, CUDA graph
#   bash benchmarks/gpu_session.sh bench [OUT]   # the benchmark runner; report at OUT/RESULTS.md
#   bash benchmarks/gpu_session.sh probe [OUT]   # per-kernel times and tile sweeps (OUT/probe.log)
#
# Needs CUDA torch, triton and cmoe installed (`pip install -e '.[triton,hf]'`). OUT defaults to
# benchmarks/gpu-out. Logs and the device description go to OUT; copy OUT/RESULTS.md over
# benchmarks/RESULTS.md and write its "read this first" note by hand.
set -uo pipefail
phase=${1:?usage: gpu_session.sh tests|bench|probe [OUT]}
out=${2:-benchmarks/gpu-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python -c "import torch, triton; print(torch.cuda.get_device_name(), 'torch', torch.__version__, \
'cuda', torch.version.cuda, 'triton', triton.__version__)" | tee "$out/device.txt" || exit 1
case "$phase" in
  tests)
    # The first candidate of each class (no tuning) keeps the matrix inside the slot; every candidate is
    # still checked by test_every_tuning_candidate_is_correct.
    CMOE_TRITON_AUTOTUNE=0 python -m pytest tests/test_triton_gpu.py tests/test_no_host_sync.py \
      tests/test_triton_kernels.py -q -rs --durations=10 2>&1 | tee "$out/tests.log"
    ;;
  bench)
    python -m benchmarks.run --min-time 0.2 --out "$out/RESULTS.md" 2>&1 | tee "$out/bench.log"
    ;;
  probe)
    OUT="$out" python -m benchmarks.probe_triton > "$out/probe_stdout.log" 2>&1
    ;;
  *)
    echo "unknown phase $phase: expected tests, bench or probe" >&2
    exit 2
    ;;
esac
