"""Quality: MTEB with its own evaluators, Billboard, prompt retrieval, long documents and compact vectors, a
fine-tuning run scored before and after (docs/evaluation.md, docs/benchmarks.md)."""
