"""Benchmarks for cmoe's token → expert dispatch: the pytest-benchmark suite and ``python -m benchmarks.run``."""
