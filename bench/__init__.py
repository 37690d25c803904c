"""Benchmarks, in two folders for their two jobs: ``bench.speed`` (throughput, latency, the server under load, peers,
GPU steps: docs/benchmarks.md, docs/serving.md) and ``bench.quality`` (``python -m bench.quality.mteb``, Billboard,
prompt retrieval, long documents: docs/evaluation.md). What both use sits here: ``common`` (corpus, environment, JSON),
``plots``, ``shapes`` (random-weight checkpoints of the published shapes)."""
