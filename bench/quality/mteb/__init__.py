"""MTEB evaluation of engines and checkpoints with mteb's own evaluators (``python -m bench.quality.mteb --help``)."""
