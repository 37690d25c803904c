"""MTEB tasks read from local folders, so that an evaluation never contacts the Hugging Face hub.

Each supported task is mteb's own registered task class (same metadata, splits, main score, evaluator and
seeds) subclassed with a ``load_data`` that fills ``self.dataset`` from the layout of ``/work/shared/data``:

- ``sts/<TASK>/<split>.jsonl``: ``{"sentence1", "sentence2", "score"}`` per line (STSBenchmark, SICK-R, STS12/13/16);
- ``scifact/``: BEIR folder ``corpus.jsonl`` (_id, title, text), ``queries.jsonl`` (_id, text), ``qrels/<split>.tsv``;
- ``banking77/{train,test}.csv`` (text, category) with ``categories.json`` giving the label order;
- ``emotion/{train,val,test}.txt`` (``text;label`` lines under a header);
- ``clustering/*.jsonl`` (``{"sentences", "labels"}``): two derived sets, not official MTEB tasks.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Callable

import mteb
from datasets import Dataset, DatasetDict
from mteb.abstasks import AbsTask
from mteb.abstasks.clustering import AbsTaskClustering
from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData
from mteb.abstasks.task_metadata import TaskMetadata

STS_TASKS = ("STSBenchmark", "SICK-R", "STS12", "STS13", "STS16")
EMOTION_LABELS = ("sadness", "joy", "love", "anger", "fear", "surprise")  # dair-ai/emotion label ids 0..5
SPLIT_FILES = {"validation": "val"}


class DataError(ValueError):
    """A local data file that is missing or malformed; the message names the file and line."""


def _need(path: Path) -> Path:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    return path


def read_jsonl(path: Path, fields: tuple[str, ...]) -> list[dict[str, Any]]:
    rows = []
    with open(_need(path), encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not JSON ({exc})") from exc
            missing = [f for f in fields if f not in row]
            if missing:
                raise DataError(f"{path}:{lineno}: missing field(s) {missing}")
            rows.append(row)
    return rows


def load_sts(folder: Path, splits: list[str]) -> DatasetDict:
    out = {}
    for split in splits:
        rows = read_jsonl(folder / f"{split}.jsonl", ("sentence1", "sentence2", "score"))
        out[split] = Dataset.from_dict(
            {
                "sentence1": [r["sentence1"] for r in rows],
                "sentence2": [r["sentence2"] for r in rows],
                "score": [float(r["score"]) for r in rows],
            }
        )
    return DatasetDict(out)


def load_beir(folder: Path, split: str) -> RetrievalSplitData:
    corpus = read_jsonl(folder / "corpus.jsonl", ("_id", "text"))
    queries = read_jsonl(folder / "queries.jsonl", ("_id", "text"))
    qrels: dict[str, dict[str, int]] = {}
    qpath = _need(folder / "qrels" / f"{split}.tsv")
    with open(qpath, encoding="utf-8") as fh:
        reader = csv.reader(fh, delimiter="\t")
        header = next(reader, None)
        if header != ["query-id", "corpus-id", "score"]:
            raise DataError(f"{qpath}:1: expected header query-id, corpus-id, score; got {header}")
        for lineno, row in enumerate(reader, 2):
            if len(row) != 3:
                raise DataError(f"{qpath}:{lineno}: expected 3 tab-separated fields, got {len(row)}")
            qrels.setdefault(row[0], {})[row[1]] = int(row[2])
    kept = [q for q in queries if str(q["_id"]) in qrels]
    return RetrievalSplitData(
        corpus=Dataset.from_dict(
            {
                "id": [str(d["_id"]) for d in corpus],
                "title": [d.get("title") or "" for d in corpus],
                "text": [d["text"] for d in corpus],
            }
        ),
        queries=Dataset.from_dict({"id": [str(q["_id"]) for q in kept], "text": [q["text"] for q in kept]}),
        relevant_docs=qrels,
        top_ranked=None,
    )


def load_banking77(folder: Path, splits: list[str]) -> DatasetDict:
    labels = json.loads(_need(folder / "categories.json").read_text(encoding="utf-8"))
    index = {name: i for i, name in enumerate(labels)}
    out = {}
    for split in splits:
        path = _need(folder / f"{split}.csv")
        texts, ids = [], []
        with open(path, encoding="utf-8", newline="") as fh:
            for lineno, row in enumerate(csv.DictReader(fh), 2):
                if row.get("category") not in index:
                    raise DataError(f"{path}:{lineno}: unknown category {row.get('category')!r}")
                texts.append(row["text"])
                ids.append(index[row["category"]])
        out[split] = Dataset.from_dict({"text": texts, "label": ids})
    return DatasetDict(out)


def load_emotion(folder: Path, splits: list[str]) -> DatasetDict:
    index = {name: i for i, name in enumerate(EMOTION_LABELS)}
    out = {}
    for split in splits:
        path = _need(folder / f"{SPLIT_FILES.get(split, split)}.txt")
        texts, ids = [], []
        with open(path, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                line = line.rstrip("\n")
                if lineno == 1 and line == "text;label_name" or not line:
                    continue
                text, sep, label = line.rpartition(";")
                if not sep or label not in index:
                    raise DataError(f"{path}:{lineno}: expected 'text;label' with label in {EMOTION_LABELS}")
                texts.append(text)
                ids.append(index[label])
        out[split] = Dataset.from_dict({"text": texts, "label": ids})
    return DatasetDict(out)


def load_clustering(path: Path) -> DatasetDict:
    rows = read_jsonl(path, ("sentences", "labels"))
    return DatasetDict({"test": Dataset.from_dict({"sentences": [r["sentences"] for r in rows], "labels": [r["labels"] for r in rows]})})


class _DerivedClustering(AbsTaskClustering):
    """A clustering task over every document of a local file (no subsampling: the sets are small)."""

    max_fraction_of_documents_to_embed = None
    max_document_to_embed = None
    file_name = ""


def _derived_metadata(name: str, source: str, description: str) -> TaskMetadata:
    return TaskMetadata(
        name=name,
        description=description,
        reference=None,
        dataset={"path": f"local/{source}", "revision": "local"},
        type="Clustering",
        category="t2c",
        modalities=["text"],
        eval_splits=["test"],
        eval_langs=["eng-Latn"],
        main_score="v_measure",
        date=None,
        domains=None,
        task_subtypes=None,
        license=None,
        annotations_creators=None,
        dialect=None,
        sample_creation=None,
        bibtex_citation="",
    )


class Banking77ClusteringDerived(_DerivedClustering):
    metadata = _derived_metadata(
        "Banking77Clustering.derived", "banking77_test_clustering", "Banking77 test utterances clustered by their 77 intents (derived, not MTEB)."
    )
    file_name = "banking77_test_clustering.jsonl"


class EmotionClusteringDerived(_DerivedClustering):
    metadata = _derived_metadata(
        "EmotionClustering.derived", "emotion_test_clustering", "Emotion test texts clustered by their 6 labels (derived, not MTEB)."
    )
    file_name = "emotion_test_clustering.jsonl"


DERIVED = {cls.metadata.name: cls for cls in (Banking77ClusteringDerived, EmotionClusteringDerived)}


def _reader(name: str, data_dir: Path) -> Callable[[AbsTask], Any]:
    """The function that builds ``task.dataset`` for task ``name`` from ``data_dir``."""
    if name in STS_TASKS:
        return lambda task: load_sts(data_dir / "sts" / name, task.eval_splits)
    if name == "SciFact":
        return lambda task: {"default": {split: load_beir(data_dir / "scifact", split) for split in task.eval_splits}}
    if name == "Banking77Classification":
        return lambda task: load_banking77(data_dir / "banking77", [task.train_split, *task.eval_splits])
    if name == "EmotionClassification":
        return lambda task: load_emotion(data_dir / "emotion", [task.train_split, *task.eval_splits])
    if name in DERIVED:
        return lambda task: load_clustering(data_dir / "clustering" / DERIVED[name].file_name)
    raise DataError(f"task {name!r} has no offline reader (supported: {', '.join(OFFLINE_TASKS)})")


OFFLINE_TASKS = (*STS_TASKS, "SciFact", "Banking77Classification", "EmotionClassification", *DERIVED)


def offline_task(name: str, data_dir: str | Path) -> AbsTask:
    """mteb's task ``name`` (or a derived clustering set) whose data comes from ``data_dir``, never the hub."""
    reader = _reader(name, Path(data_dir))
    base = DERIVED[name] if name in DERIVED else type(mteb.get_task(name))

    def load_data(self: AbsTask, num_proc: int | None = None, **kwargs: Any) -> None:
        if self.data_loaded:
            return
        self.dataset = reader(self)
        self.data_loaded = True

    cls = type(f"Offline{base.__name__}", (base,), {"load_data": load_data, "__module__": __name__})
    return cls()
