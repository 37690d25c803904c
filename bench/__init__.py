"""Benchmarks: quality (``python -m bench.mteb``, ``bench.billboard``, ``bench.prompt_retrieval``: docs/evaluation.md),
CPU throughput and latency, GPU steps."""
