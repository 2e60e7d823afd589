"""cmoe.benchmarks — timing of cmoe's token → expert dispatch against the reference loop, peers and a dense
GEMM of the same FLOPs: ``python -m cmoe.benchmarks.run`` (Markdown tables), the pytest-benchmark suite in
``benchmarks/suite/``, the Triton probe and ahead-of-time compile check, the one-call GPU session script.
"""

if __name__ != "cmoe.benchmarks":  # found as a bare `benchmarks` (repository root on sys.path): see
    import runpy                   # cmoe/source_folders.py

    runpy.run_path(f"{__path__[0]}/../cmoe/source_folders.py")["hand_over"](__name__)
