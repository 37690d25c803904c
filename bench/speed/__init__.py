"""Speed: docs/s and latency of the engines, the server under load, the peers, the GPU steps (docs/benchmarks.md,
docs/serving.md)."""
