"""What the MTEB command needs before mteb itself: the instruction tables, the paper's task categories and the
local data layouts. No mteb import here (it takes half a minute on a loaded machine), so that ``--help`` and the
checks that need no model (the hub in reach, the options) answer at once."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

INSTRUCTIONS_FILE = Path(__file__).resolve().parent.parent / "mteb_instructions.json"
ALL = "all"
CQADUPSTACK = "CQADupstackRetrieval"
DERIVED_NAMES = ("Banking77Clustering.derived", "EmotionClustering.derived")  # bench.quality.mteb.offline.DERIVED
# Files per task type in a task's local folder (docs/evaluation.md#local-layouts).
LAYOUTS = {
    "STS": "<split>.jsonl: sentence1, sentence2, score",
    "Classification": "<split>.jsonl (text, label), <split>.csv (text, label or category) or <split>.txt ('text;label' "
    "lines), for the train split and each eval split; optional categories.json / labels.json: the label order",
    "Clustering": "<split>.jsonl: sentences, labels (a line per set of lists, or a line per text)",
    "PairClassification": "<split>.jsonl: the hub dataset's columns (e.g. sentence1 or sent1, sentence2 or sent2, labels)",
    "Summarization": "<split>.jsonl: text, human_summaries, machine_summaries, relevance",
    "Retrieval": "corpus.jsonl (_id, title, text), queries.jsonl (_id, text), qrels/<split>.tsv (query-id, corpus-id, score)",
    "Reranking": "the retrieval files plus top_ranked/<split>.jsonl (query-id, corpus-ids), or <split>.jsonl: query, "
    "positive, negative",
}
TYPE_FOLDERS = {kind: kind.lower() for kind in LAYOUTS}  # DATA_DIR/<type folder>/<TASK>


def instruction_tables(path: Path = INSTRUCTIONS_FILE) -> dict[str, dict[str, dict[str, Any]]]:
    """The tables of ``mteb_instructions.json``, keyed by model name (``hkunlp/instructor-large`` ...)."""
    data = json.loads(path.read_text(encoding="utf-8"))
    return {k: v for k, v in data.items() if not k.startswith("_")}


def categories(path: Path = INSTRUCTIONS_FILE) -> dict[str, list[str]]:
    """Category name (``retrieval``, ``pair_classification`` ...) -> its task names, in the paper's order."""
    return json.loads(path.read_text(encoding="utf-8"))["_categories"]


def category_of(task_name: str) -> str | None:
    """The category a task belongs to, or None for a task outside the paper's set."""
    return next((cat for cat, names in categories().items() if task_name in names), None)


def dataset_of(task_name: str) -> str:
    """The dataset a task counts as in an average: CQADupstack's subforums are one dataset."""
    return CQADUPSTACK if task_name.startswith("CQADupstack") else task_name
