"""Billboard's files as upstream ships them: ``<task>_references.jsonl`` and ``<task>_THumB-1.0.jsonl`` per task."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.quality.datafiles import DataError, MissingData, read_jsonl

# task -> folder and file prefix (upstream evaluation/text_evaluation/data/<folder>/<folder>_*.jsonl)
FOLDERS = {"mscoco": "mscoco", "cnndm": "cnndm", "mt": "wmt20-zh-en"}


@dataclass
class BillboardTask:
    """One task's texts: references per segment, and each hypothesis with its segment and human score."""

    name: str
    references: list[list[str]]  # per segment, in the references file's order
    seg_ids: list[str]
    hyps: list[str]  # in the THumB file's order
    hyp_segment: np.ndarray  # int64 [hyps]: index into references
    human: np.ndarray  # float64 [hyps]
    files: tuple[Path, Path]  # references, THumB


def task_files(data_dir: Path, task: str) -> tuple[Path, Path]:
    """The references and THumB files of ``task`` in ``data_dir/<folder>`` or ``data_dir/billboard/<folder>``."""
    if task not in FOLDERS:
        raise MissingData(f"unknown Billboard task {task!r} (have: {', '.join(FOLDERS)})")
    folder = FOLDERS[task]
    names = (f"{folder}_references.jsonl", f"{folder}_THumB-1.0.jsonl")
    places = [data_dir / folder, data_dir / "billboard" / folder]
    for place in places:
        if all((place / n).is_file() for n in names):
            return place / names[0], place / names[1]
    looked = "; ".join(f"{p} (missing {', '.join(n for n in names if not (p / n).is_file())})" for p in places)
    raise MissingData(f"Billboard task {task}: files not found. Looked in: {looked}. Expected: {names[0]} and {names[1]}")


def read_task(data_dir: Path, task: str) -> BillboardTask:
    """Read and check one task: unique segment ids with non-empty string references; every hyp of a known segment."""
    ref_path, thumb_path = task_files(data_dir, task)
    seg_ids: list[str] = []
    references: list[list[str]] = []
    index: dict[str, int] = {}
    for lineno, row in enumerate(read_jsonl(ref_path, ("seg_id", "refs")), 1):
        seg = str(row["seg_id"])
        refs = row["refs"]
        if seg in index:
            raise DataError(f"{ref_path}: row {lineno}: seg_id {seg!r} repeats row {index[seg] + 1}")
        if not isinstance(refs, list) or not refs or not all(isinstance(r, str) for r in refs):
            raise DataError(f"{ref_path}: row {lineno}: refs must be a non-empty list of strings")
        index[seg] = len(seg_ids)
        seg_ids.append(seg)
        references.append(refs)
    hyps, segments, human = [], [], []
    for lineno, row in enumerate(read_jsonl(thumb_path, ("seg_id", "hyp", "human_score")), 1):
        seg = str(row["seg_id"])
        if seg not in index:
            raise DataError(f"{thumb_path}: row {lineno}: seg_id {seg!r} has no references in {ref_path.name}")
        if not isinstance(row["hyp"], str):
            raise DataError(f"{thumb_path}: row {lineno}: hyp must be a string")
        if not isinstance(row["human_score"], (int, float)) or isinstance(row["human_score"], bool):
            raise DataError(f"{thumb_path}: row {lineno}: human_score must be a number, got {row['human_score']!r}")
        hyps.append(row["hyp"])
        segments.append(index[seg])
        human.append(float(row["human_score"]))
    if len(hyps) < 3:
        raise DataError(f"{thumb_path}: {len(hyps)} hypotheses; a correlation needs at least 3")
    return BillboardTask(task, references, seg_ids, hyps, np.asarray(segments, dtype=np.int64), np.asarray(human), (ref_path, thumb_path))
