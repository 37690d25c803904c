"""The INSTRUCTOR paper's English MTEB by category, and which of its tasks a data folder holds.

The task lists are ``_categories`` of ``bench/quality/mteb_instructions.json`` (56 datasets; CQADupstack as its 12
subforums). ``--category`` runs the tasks found and names the others, with what each lacks; a category's average
counts CQADupstack once, as the mean of the subforums run, as MTEB's leaderboard and the paper do.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mteb.abstasks import AbsTask

from bench.quality.datafiles import DataError
from bench.quality.mteb.offline import offline_task
from bench.quality.mteb.tables import ALL, CQADUPSTACK, categories, category_of, dataset_of  # noqa: F401 (re-exported)


@dataclass(frozen=True)
class Missing:
    """A task of the category that is not run, and why: no files (the folders looked in and the files expected),
    or ``failed``, files that could not be read."""

    task: str
    category: str
    reason: str
    failed: bool = False


def find_category(category: str, data_dir: Path) -> tuple[list[AbsTask], list[Missing]]:
    """The category's tasks (every category's for ``all``) whose files are in ``data_dir``, set up as upstream ran
    them (``offline_task(..., upstream_setup=True)``), and the ones missing."""
    chosen = categories() if category == ALL else {category: categories()[category]}
    found, missing = [], []
    for cat, names in chosen.items():
        for name in names:
            try:
                found.append(offline_task(name, data_dir, upstream_setup=True))
            except DataError as exc:
                missing.append(Missing(name, cat, str(exc)))
    return found, missing


def averages(rows: list[dict[str, Any]], category: str) -> dict[str, dict[str, Any]]:
    """Per category: the mean main score over the datasets run, and how many of the category's datasets that is."""
    chosen = categories() if category == ALL else {category: categories()[category]}
    out = {}
    for cat, names in chosen.items():
        by_dataset: dict[str, list[float]] = {}
        for row in rows:
            if row["task"] in names:
                by_dataset.setdefault(dataset_of(row["task"]), []).append(row["score"])
        means = [sum(v) / len(v) for v in by_dataset.values()]
        out[cat] = {
            "score": sum(means) / len(means) if means else None,
            "datasets_run": len(means),
            "datasets": len({dataset_of(n) for n in names}),
        }
    return out
