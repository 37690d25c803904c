"""Billboard: INSTRUCTOR's text-generation evaluation (upstream ``evaluation/text_evaluation/main.py``).

Every reference and every generated text (``hyp``) is embedded with the task's instruction; a hypothesis scores
the maximum cosine over its segment's references, and the task's figure is the Pearson correlation of those
scores with the human judgments (THumB 1.0). ``python -m bench.quality.billboard --help``.
"""
