"""Prompt retrieval: INSTRUCTOR's demonstration selection for in-context learning (upstream
``evaluation/prompt_retrieval``), with pluggable causal-LM scoring. ``python -m bench.quality.prompt_retrieval --help``."""
