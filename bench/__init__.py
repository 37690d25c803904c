"""Benchmarks: MTEB quality (``python -m bench.mteb``), CPU throughput and latency, GPU steps."""
