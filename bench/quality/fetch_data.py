"""``python -m bench.quality.fetch_data DATA_DIR --tasks ...|--category ...``: MTEB tasks' hub datasets written as the
local layout ``python -m bench.quality.mteb --data-dir DATA_DIR`` reads, for machines that cannot reach the hub.

Run it where the Hugging Face hub is reachable and copy DATA_DIR over. Each task is loaded by mteb itself, from the
dataset and revision its metadata pins, with its ``dataset_transform`` left out: the files hold the hub dataset's own
columns, and the evaluation applies the transform (renames, seeded subsampling) when it reads them, as it would on
the hub's data. Written per task, into ``DATA_DIR/<type>/<Task>/`` (``docs/evaluation.md#local-layouts``):

- STS, classification, clustering, pair classification, summarization: ``<split>.jsonl`` for each split the
  evaluation reads (classification: the train split too); a multilingual task, one folder per subset;
- retrieval and reranking: BEIR files ``corpus.jsonl``, ``queries.jsonl``, ``qrels/<split>.tsv`` (reranking: and
  ``top_ranked/<split>.jsonl``);
- ``SOURCE.txt``: the dataset, its revision, license and reference, and when it was fetched.

A task's folder is written under a temp name and renamed when complete; an existing one needs ``--overwrite``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Iterable, TextIO

from bench.quality import cli
from bench.quality.datafiles import DataError, MissingData
from bench.quality.hub import NO_HUB_HINT, HubUnreachable, require_hub
from bench.quality.mteb.tables import ALL, LAYOUTS, TYPE_FOLDERS, categories

SEARCH_TYPES = ("Retrieval", "Reranking")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = cli.parser("python -m bench.quality.fetch_data", __doc__)
    p.add_argument("data_dir", type=Path, metavar="DATA_DIR", help="the folder to write (created if missing)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--tasks", nargs="+", help="MTEB task names, e.g. STSBenchmark SciFact Banking77Classification")
    which.add_argument("--category", choices=[*categories(), ALL],
                       help="every task of this category of the INSTRUCTOR paper's English MTEB (implies --upstream)")
    p.add_argument("--upstream", action="store_true",
                   help="only what upstream's evaluate_model.py evaluated: the English subset of a multilingual task and "
                        "the test split where there is one (what bench.quality.mteb --category reads)")
    p.add_argument("--overwrite", action="store_true", help="replace a task folder that is already there")
    return p.parse_args(argv)


def task_names(args: argparse.Namespace) -> list[str]:
    if args.tasks:
        return list(dict.fromkeys(args.tasks))
    chosen = categories() if args.category == ALL else {args.category: categories()[args.category]}
    return [name for names in chosen.values() for name in names]


def prepare(name: str, upstream: bool) -> Any:
    """mteb's task ``name``, refused before any download when its type has no local layout."""
    import mteb

    from bench.quality.mteb.offline import restrict_to_upstream

    try:
        task = mteb.get_task(name)
    except KeyError as exc:
        raise MissingData(f"task {name!r} is not registered in mteb {mteb.__version__}") from exc
    if task.metadata.type not in LAYOUTS:
        raise MissingData(f"task {name}: type {task.metadata.type} has no local layout (supported: {', '.join(LAYOUTS)})")
    return restrict_to_upstream(task) if upstream else task


def load_raw(task: Any) -> None:
    """``task.load_data()`` from the hub without the task's transform (the evaluation runs it on the files)."""
    task.dataset_transform = lambda *args, **kwargs: None  # this instance only
    try:
        task.load_data()
    except OSError as exc:  # ConnectionError, the hub's HTTP errors, a dataset missing from the offline cache
        why = " ".join(str(exc).split())[:300]
        raise HubUnreachable(f"{task.metadata.name}: {task.metadata.dataset.get('path')} could not be loaded from the "
                             f"hub ({why}); {NO_HUB_HINT}") from exc


def _write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
            count += 1
    return count


def write_tables(task: Any, folder: Path) -> list[str]:
    """Table types: ``<split>.jsonl`` of each split the evaluation reads, per subset of a multilingual task; what
    was written, one line per file."""
    from bench.quality.mteb.offline import task_splits

    subsets = task.dataset.items() if task.metadata.is_multilingual else [("default", task.dataset)]
    written = []
    for subset, splits in subsets:
        where = folder / subset if task.metadata.is_multilingual else folder
        for split in task_splits(task):
            if split not in splits:
                raise DataError(f"task {task.metadata.name}: the hub dataset has no {split!r} split in subset {subset} "
                                f"(it has {list(splits)})")
            count = _write_jsonl(where / f"{split}.jsonl", splits[split])
            written.append(f"{(where / split).relative_to(folder)}.jsonl: {count} rows")
    return written


def write_search(task: Any, folder: Path) -> list[str]:
    """Retrieval and reranking: BEIR files per subset, the corpus and queries once, judgements per split; what was
    written, one line per subset."""
    written = []
    for subset, splits in task.dataset.items():
        where = folder / subset if task.metadata.is_multilingual else folder
        first = next(iter(splits.values()))
        corpus = first["corpus"]
        for split, data in splits.items():
            if len(data["corpus"]) != len(corpus):
                raise DataError(f"task {task.metadata.name}: split {split} has another corpus ({len(data['corpus'])} "
                                f"documents, not {len(corpus)}); one corpus per task folder is supported")
        docs = _write_jsonl(where / "corpus.jsonl", ({"_id": str(d["id"]), "title": d.get("title") or "", "text": d["text"]}
                                                      for d in corpus))
        queries: dict[str, str] = {}
        for data in splits.values():
            queries.update((str(q["id"]), q["text"]) for q in data["queries"])
        _write_jsonl(where / "queries.jsonl", ({"_id": qid, "text": text} for qid, text in queries.items()))
        for split, data in splits.items():
            (where / "qrels").mkdir(parents=True, exist_ok=True)
            with open(where / "qrels" / f"{split}.tsv", "w", encoding="utf-8") as fh:
                fh.write("query-id\tcorpus-id\tscore\n")
                for qid, docs_scores in data["relevant_docs"].items():
                    fh.writelines(f"{qid}\t{doc}\t{int(score)}\n" for doc, score in docs_scores.items())
            if data.get("top_ranked"):
                _write_jsonl(where / "top_ranked" / f"{split}.jsonl",
                             ({"query-id": qid, "corpus-ids": list(ids)} for qid, ids in data["top_ranked"].items()))
        written.append(f"{'' if where == folder else where.relative_to(folder)}: {docs} documents, {len(queries)} "
                       f"queries, judgements of {', '.join(splits)}")
    return written


def source_note(task: Any) -> str:
    meta = task.metadata
    import mteb

    return (f"task: {meta.name} ({meta.type})\ndataset: {meta.dataset.get('path')}\nrevision: {meta.dataset.get('revision')}\n"
            f"license: {meta.license}\nreference: {meta.reference}\n"
            f"fetched: {time.strftime('%Y-%m-%d')} by python -m bench.quality.fetch_data (mteb {mteb.__version__}), "
            "the hub dataset's columns without mteb's dataset_transform\n")


def fetch(task: Any, data_dir: Path, overwrite: bool, log: TextIO = sys.stderr) -> Path:
    """Download one task and write its folder (complete, or not at all); its path."""
    folder = data_dir / TYPE_FOLDERS[task.metadata.type] / task.metadata.name
    if folder.exists() and not overwrite:
        raise FileExistsError(f"{folder} exists; pass --overwrite to replace it")
    print(f"{task.metadata.name}: loading {task.metadata.dataset.get('path')} at {task.metadata.dataset.get('revision')} "
          "from the hub ...", file=log, flush=True)
    load_raw(task)
    partial = folder.with_name(f".{folder.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        written = write_search(task, partial) if task.metadata.type in SEARCH_TYPES else write_tables(task, partial)
        (partial / "SOURCE.txt").write_text(source_note(task), encoding="utf-8")
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if folder.exists():
        shutil.rmtree(folder)
    partial.rename(folder)
    for line in written:
        print(f"  {folder}/{line}", file=log)
    return folder


def main(argv: list[str] | None = None) -> int:
    """Exit 0 when every task was written; 2 an unknown task or a folder in the way; 3 no hub in reach."""
    args = parse_args(argv)

    def body() -> int:
        require_hub("fetching evaluation data", "run this where the hub is reachable (or set HF_ENDPOINT to a mirror) "
                    "and copy DATA_DIR here")
        upstream = args.upstream or args.category is not None
        tasks = [prepare(name, upstream) for name in task_names(args)]  # every name checked before any download
        args.data_dir.mkdir(parents=True, exist_ok=True)
        for task in tasks:
            fetch(task, args.data_dir, args.overwrite)
        names = " ".join(t.metadata.name for t in tasks)
        print(f"wrote {len(tasks)} task(s) under {args.data_dir}; evaluate with: python -m bench.quality.mteb --engine "
              f"ENGINE --data-dir {args.data_dir} --tasks {names}")
        return 0

    return cli.run(body, "bench.quality.fetch_data", args.debug)


if __name__ == "__main__":
    sys.exit(main())
