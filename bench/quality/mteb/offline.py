"""Any registered MTEB task read from local files, so that an evaluation never contacts the Hugging Face hub.

The task stays mteb's own registered class (metadata, splits, main score, evaluator, seeds and its own
``dataset_transform``, e.g. renames or seeded subsampling); only ``load_data`` is replaced. The reader is chosen
by the task's type and the files found under the data folder, in the first of these folders that exists:
``<type folder>/<TASK>``, ``<TASK>``, ``<task>`` (lower case) and ``<task>`` without its type suffix
(``Banking77Classification`` -> ``banking77``). The layouts per type are ``LAYOUTS`` (and docs/evaluation.md):

- STS, classification, clustering, pair classification, summarization: one table file per split, holding the
  columns of the task's hub dataset (``<split>.jsonl``; classification also ``<split>.csv`` and ``<split>.txt``
  ``text;label`` lines). String labels become ids in the order of ``categories.json`` / ``labels.json``, else
  sorted. Multilingual tasks: one folder per hub subset (``STS17/en-en/test.jsonl``); subsets without files are
  left out.
- retrieval: a BEIR folder (``corpus.jsonl``, ``queries.jsonl``, ``qrels/<split>.tsv``); reranking adds
  ``top_ranked/<split>.jsonl`` or comes as ``<split>.jsonl`` rows ``{query, positive, negative}``.

Two derived clustering sets (``Banking77Clustering.derived``, ``EmotionClustering.derived``: the classification
test sets clustered by label, from ``clustering/*.jsonl``) are defined here; they are not MTEB tasks.

``offline_task(..., upstream_setup=True)`` restricts a task to what upstream's ``evaluate_model.py`` ran
(``MTEB(task_langs=["en"])``, ``--split test``): the English subset of a multilingual task (``en``, or ``en-en``
for STS17) and the test split where the task has one.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path
from typing import Any

import mteb
from datasets import Dataset, DatasetDict
from mteb.abstasks import AbsTask
from mteb.abstasks.clustering import AbsTaskClustering
from mteb.abstasks.clustering_legacy import AbsTaskClusteringLegacy
from mteb.abstasks.retrieval import AbsTaskRetrieval
from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData
from mteb.abstasks.task_metadata import TaskMetadata

from bench.quality.datafiles import DataError, MissingData, need_file, read_json, read_jsonl
from bench.quality.mteb.tables import LAYOUTS, TYPE_FOLDERS

TABLE_TYPES = ("STS", "Classification", "Clustering", "PairClassification", "Summarization")
SEARCH_TYPES = ("Retrieval", "Reranking")
SPLIT_NAMES = {"validation": ("validation", "val", "dev")}
TABLE_SUFFIXES = {"Classification": (".jsonl", ".csv", ".txt")}
TYPE_SUFFIXES = ("PairClassification", "Classification", "Clustering", "Retrieval", "Reranking", "Summarization", "STS")
LABEL_ORDER_FILES = ("categories.json", "labels.json")
UPSTREAM_SUBSETS = ("en", "en-en")  # what MTEB(task_langs=["en"]) kept of a multilingual task
UPSTREAM_SPLIT = "test"  # evaluate_model.py's --split default


def read_qrels(path: Path) -> dict[str, dict[str, int]]:
    """BEIR ``qrels/<split>.tsv``: a header ``query-id corpus-id score``, then one judgement per line."""
    qrels: dict[str, dict[str, int]] = {}
    with open(need_file(path), encoding="utf-8") as fh:
        reader = csv.reader(fh, delimiter="\t")
        header = next(reader, None)
        if header != ["query-id", "corpus-id", "score"]:
            raise DataError(f"{path}:1: expected header query-id, corpus-id, score; got {header}")
        for lineno, row in enumerate(reader, 2):
            if len(row) != 3:
                raise DataError(f"{path}:{lineno}: expected 3 tab-separated fields, got {len(row)}")
            try:
                qrels.setdefault(row[0], {})[row[1]] = int(row[2])
            except ValueError as exc:
                raise DataError(f"{path}:{lineno}: score {row[2]!r} is not an integer") from exc
    return qrels


def load_beir(folder: Path, split: str) -> RetrievalSplitData:
    """One split of a BEIR folder; queries without judgements are dropped, as mteb's own loader does."""
    corpus = read_jsonl(folder / "corpus.jsonl", ("_id", "text"))
    queries = read_jsonl(folder / "queries.jsonl", ("_id", "text"))
    qrels = read_qrels(folder / "qrels" / f"{split}.tsv")
    kept = [q for q in queries if str(q["_id"]) in qrels]
    top_path = folder / "top_ranked" / f"{split}.jsonl"
    top_ranked = None
    if top_path.is_file():
        top_ranked = {str(r["query-id"]): [str(d) for d in r["corpus-ids"]] for r in read_jsonl(top_path, ("query-id", "corpus-ids"))}
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
        top_ranked=top_ranked,
    )


def load_reranking_rows(path: Path, split: str) -> RetrievalSplitData:
    """MTEB v1 reranking rows ``{query, positive: [...], negative: [...]}`` as a retrieval split with ``top_ranked``.

    Ids follow mteb's own conversion (``AbsTaskReranking._process_example``): rows without a positive or a negative
    are dropped, the query is ``<split>_query<i>`` and positives come first.
    """
    corpus: dict[str, list[str]] = {"id": [], "title": [], "text": []}
    queries: dict[str, list[str]] = {"id": [], "text": []}
    qrels: dict[str, dict[str, int]] = {}
    top_ranked: dict[str, list[str]] = {}
    kept = [r for r in read_jsonl(path, ("query", "positive", "negative")) if r["positive"] and r["negative"]]
    for i, row in enumerate(kept):
        qid = f"{split}_query{i}"
        queries["id"].append(qid)
        queries["text"].append(row["query"])
        docs = [(f"apositive_{qid}_{j:05d}", text, 1) for j, text in enumerate(row["positive"])]
        docs += [(f"negative_{qid}_{j:05d}", text, 0) for j, text in enumerate(row["negative"])]
        for doc_id, text, relevance in docs:
            corpus["id"].append(doc_id)
            corpus["title"].append("")
            corpus["text"].append(text)
            qrels.setdefault(qid, {})[doc_id] = relevance
        top_ranked[qid] = [d[0] for d in docs]
    return RetrievalSplitData(
        corpus=Dataset.from_dict(corpus), queries=Dataset.from_dict(queries), relevant_docs=qrels, top_ranked=top_ranked
    )


def read_table(path: Path) -> list[dict[str, Any]]:
    """Rows of one split file: JSON lines as written, csv rows (``category`` read as ``label``), or ``text;label`` lines."""
    if path.suffix == ".jsonl":
        rows = read_jsonl(path)
        if rows:
            want = set(rows[0])
            for lineno, row in enumerate(rows, 1):
                if set(row) != want:
                    raise DataError(f"{path}: row {lineno}: fields {sorted(row)} differ from the first row's {sorted(want)}")
        return rows
    if path.suffix == ".csv":
        with open(path, encoding="utf-8", newline="") as fh:
            rows = list(csv.DictReader(fh))
        for row in rows:
            if "label" not in row and "category" in row:
                row["label"] = row.pop("category")
        return rows
    rows = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.rstrip("\n")
            if not line or lineno == 1 and line in ("text;label", "text;label_name"):
                continue
            text, sep, label = line.rpartition(";")
            if not sep or not label:
                raise DataError(f"{path}:{lineno}: expected 'text;label'")
            rows.append({"text": text, "label": label})
    return rows


def split_file(folder: Path, split: str, suffixes: tuple[str, ...]) -> Path | None:
    """The file holding ``split`` in ``folder`` (``validation`` may be ``val`` or ``dev``), or None."""
    for name in SPLIT_NAMES.get(split, (split,)):
        for suffix in suffixes:
            if (folder / f"{name}{suffix}").is_file():
                return folder / f"{name}{suffix}"
    return None


def _label_ids(task: AbsTask, folder: Path, splits: dict[str, list[dict[str, Any]]]) -> None:
    """Classification labels given as names become ids: the order of a label-order file, else sorted names."""
    column = task.label_column_name
    names = {r[column] for rows in splits.values() for r in rows if isinstance(r.get(column), str)}
    if not names:
        return
    order_file = next((folder / f for f in LABEL_ORDER_FILES if (folder / f).is_file()), None)
    order = list(read_json(order_file)) if order_file else sorted(names)
    index = {name: i for i, name in enumerate(order)}
    for split, rows in splits.items():
        for lineno, row in enumerate(rows, 1):
            if row[column] not in index:
                raise DataError(f"{folder}: split {split}, row {lineno}: label {row[column]!r} not in {order_file}")
            row[column] = index[row[column]]


def _as_cluster_sets(task: AbsTask, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Legacy clustering evaluates sets (a row of lists each); a file of one text per line is one set."""
    text, label = task.input_column_name, task.label_column_name
    if not isinstance(task, AbsTaskClusteringLegacy) or not rows or isinstance(rows[0][text], list):
        return rows
    return [{text: [r[text] for r in rows], label: [r[label] for r in rows]}]


def _needed_columns(task: AbsTask) -> list[str]:
    """The columns the task's evaluator reads, from the class's own column-name attributes."""
    names = [getattr(task, a) for a in dir(task) if a.endswith("_column_name")]
    if task.metadata.type == "STS":
        names += [*task.column_names, "score"]
    return [n for n in names if isinstance(n, str)]


def task_splits(task: AbsTask) -> list[str]:
    """The splits the evaluation reads: the eval splits, plus the train split for classification."""
    train = [task.train_split] if task.metadata.type == "Classification" else []
    return list(dict.fromkeys([*train, *task.eval_splits]))


def load_tables(task: AbsTask, folder: Path, files: dict[str, Path]) -> DatasetDict:
    """One subset's split files as a ``DatasetDict``, in the shape the task's hub dataset has."""
    splits = {split: read_table(path) for split, path in files.items()}
    for split, path in files.items():
        if not splits[split]:
            raise DataError(f"{path}: no rows")
    if task.metadata.type == "Classification":
        _label_ids(task, folder, splits)
    if task.metadata.type == "Clustering":
        splits = {s: _as_cluster_sets(task, rows) for s, rows in splits.items()}
    return DatasetDict({s: Dataset.from_list(rows) for s, rows in splits.items()})


def _subset_folders(task: AbsTask, folder: Path) -> dict[str, Path]:
    if not task.metadata.is_multilingual:
        return {"default": folder}
    return {s: folder / s for s in task.hf_subsets if (folder / s).is_dir()}


def _reranking_rows(task: AbsTask, folder: Path, split: str) -> Path | None:
    """A reranking split given as ``{query, positive, negative}`` rows, if that is how it comes."""
    path = folder / f"{split}.jsonl"
    return path if task.metadata.type == "Reranking" and path.is_file() else None


def _search_files_missing(task: AbsTask, folder: Path) -> list[str]:
    beir_splits = [s for s in task.eval_splits if _reranking_rows(task, folder, s) is None]
    missing = [f for f in ("corpus.jsonl", "queries.jsonl") if beir_splits and not (folder / f).is_file()]
    for split in beir_splits:
        if not (folder / "qrels" / f"{split}.tsv").is_file():
            missing.append(f"qrels/{split}.tsv")
        if task.metadata.type == "Reranking" and not (folder / "top_ranked" / f"{split}.jsonl").is_file():
            missing.append(f"top_ranked/{split}.jsonl (or {split}.jsonl with query, positive, negative)")
    return missing


def _table_files(task: AbsTask, folder: Path) -> tuple[dict[str, Path], list[str]]:
    suffixes = TABLE_SUFFIXES.get(task.metadata.type, (".jsonl",))
    files, missing = {}, []
    for split in task_splits(task):
        path = split_file(folder, split, suffixes)
        if path is None:
            missing.append("|".join(f"{split}{s}" for s in suffixes))
        else:
            files[split] = path
    return files, missing


def candidate_folders(task: AbsTask, data_dir: Path) -> list[Path]:
    """Where the task's files may be, in order (see the module docstring)."""
    name = task.metadata.name
    short = name
    for suffix in TYPE_SUFFIXES:
        if short.endswith(suffix) and len(short) > len(suffix):
            short = short[: -len(suffix)]
            break
    paths = [data_dir / TYPE_FOLDERS[task.metadata.type] / name, data_dir / name, data_dir / name.lower(), data_dir / short.lower()]
    return list(dict.fromkeys(paths))


def _missing_error(task: AbsTask, looked: list[tuple[Path, list[str]]]) -> MissingData:
    meta = task.metadata
    where = "; ".join(f"{p} ({'missing ' + ', '.join(m) if p.is_dir() else 'no such folder'})" for p, m in looked)
    subsets = f" One folder per subset ({', '.join(task.hf_subsets)}) inside it." if meta.is_multilingual else ""
    return MissingData(f"task {meta.name} ({meta.type}): no local files. Looked in: {where}. Expected: {LAYOUTS[meta.type]}.{subsets}")


def find_data(task: AbsTask, data_dir: Path) -> tuple[Path, dict[str, Any]]:
    """The folder holding the task's files and, per subset, what to read; else a ``DataError`` naming what is missing."""
    kind = task.metadata.type
    if kind not in LAYOUTS:
        raise MissingData(f"task {task.metadata.name}: type {kind} has no offline reader (supported: {', '.join(LAYOUTS)})")
    looked = []
    for folder in candidate_folders(task, data_dir):
        subsets = _subset_folders(task, folder)
        found, missing = {}, []
        for subset, sub in subsets.items():
            if kind in SEARCH_TYPES:
                gaps = _search_files_missing(task, sub)
                files: Any = sub
            else:
                files, gaps = _table_files(task, sub)
            if gaps:
                missing += [f"{subset}/{g}" if task.metadata.is_multilingual else g for g in gaps]
            else:
                found[subset] = files
        if found:  # a multilingual task runs the subsets whose files are all here
            return folder, found
        looked.append((folder, missing or [f"<subset>/{LAYOUTS[kind].split(':')[0]}"]))
    raise _missing_error(task, looked)


def _load(task: AbsTask, folder: Path, found: dict[str, Any]) -> Any:
    kind = task.metadata.type
    if kind in SEARCH_TYPES:
        return {
            subset: {
                split: load_reranking_rows(rows, split) if (rows := _reranking_rows(task, sub, split)) else load_beir(sub, split)
                for split in task.eval_splits
            }
            for subset, sub in found.items()
        }
    tables = {subset: load_tables(task, folder / subset if subset != "default" else folder, files) for subset, files in found.items()}
    return tables if task.metadata.is_multilingual else tables["default"]


def _check_columns(task: AbsTask, folder: Path) -> None:
    if isinstance(task, AbsTaskRetrieval):
        return
    subsets = task.dataset.items() if task.metadata.is_multilingual else [("default", task.dataset)]
    need = _needed_columns(task)
    for subset, splits in subsets:
        for split, data in splits.items():
            missing = [c for c in need if c not in data.column_names]
            if missing:
                where = folder / subset if task.metadata.is_multilingual else folder
                raise DataError(f"{where}: split {split} lacks column(s) {missing} that {task.metadata.name} reads (has {data.column_names})")


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


def _registered(name: str) -> type[AbsTask]:
    if name in DERIVED:
        return DERIVED[name]
    try:
        return type(mteb.get_task(name))
    except KeyError as exc:
        raise MissingData(f"task {name!r} is not registered in mteb {mteb.__version__} (nor one of {', '.join(DERIVED)})") from exc


def restrict_to_upstream(task: AbsTask) -> AbsTask:
    """Keep what upstream's evaluate_model.py evaluated: the English subsets and the test split (see the module doc)."""
    if task.metadata.is_multilingual:
        task.hf_subsets = [s for s in task.hf_subsets if s in UPSTREAM_SUBSETS]
    if UPSTREAM_SPLIT in task.eval_splits:
        task.filter_eval_splits([UPSTREAM_SPLIT])
    return task


def offline_task(name: str, data_dir: str | Path, upstream_setup: bool = False) -> AbsTask:
    """mteb's task ``name`` (or a derived clustering set) whose data comes from ``data_dir``, never the hub.

    The files are located now, so that a missing file is reported before any model runs. ``upstream_setup``:
    only the subsets and split upstream evaluated (``restrict_to_upstream``).
    """
    data_dir = Path(data_dir)
    base = _registered(name)
    probe = restrict_to_upstream(base()) if upstream_setup else base()
    if name in DERIVED:
        path = need_file(data_dir / "clustering" / DERIVED[name].file_name)
        folder, found = path.parent, {"default": {"test": path}}
    else:
        folder, found = find_data(probe, data_dir)
    if probe.metadata.is_multilingual:
        skipped = [s for s in probe.hf_subsets if s not in found]
        if skipped:
            print(f"note: {name}: no files for subset(s) {skipped} under {folder}: evaluating {sorted(found)}", file=sys.stderr)

    def load_data(self: AbsTask, num_proc: int | None = None, **kwargs: Any) -> None:
        if self.data_loaded:
            return
        self.dataset = _load(self, folder, found)
        try:
            self.dataset_transform(num_proc=num_proc)
        except (KeyError, ValueError) as exc:
            raise DataError(
                f"{folder}: mteb's {base.__name__}.dataset_transform failed on these files ({exc}); "
                "they must hold the columns of the task's hub dataset"
            ) from exc
        _check_columns(self, folder)
        self.data_loaded = True

    cls = type(f"Offline{base.__name__}", (base,), {"load_data": load_data, "__module__": __name__})
    task = restrict_to_upstream(cls()) if upstream_setup else cls()
    if probe.metadata.is_multilingual:
        task.hf_subsets = [s for s in task.hf_subsets if s in found]
    return task

