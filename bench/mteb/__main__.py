"""``python -m bench.mteb --engine X --tasks ...``: MTEB scores of an engine or checkpoint, by mteb's own evaluators."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench.common import write_json
from bench.datafiles import DataError
from bench.encoders import default_table, load_encoder
from bench.mteb.model import Instructions, InstructorMTEBModel, instruction_tables
from bench.mteb.offline import DERIVED, LAYOUTS, offline_task

DESCRIPTION = """\
Evaluate an engine bundle (.onnx / .plan, run by runtime.Encoder) or a checkpoint folder (run by the PyTorch
reference model) on MTEB tasks with mteb's own evaluators.

Instructions: --instructions-for picks one table of bench/mteb_instructions.json (the INSTRUCTOR evaluation
tables: {tables});
retrieval and reranking tasks get a query and a corpus instruction, and corpus documents are (title + " " + text).strip(). 'none' encodes plain strings, as
sentence-transformers models such as all-MiniLM-L6-v2 expect. Default: hkunlp/instructor-large for T5
(INSTRUCTOR) models, none for any other architecture.

Data: without --data-dir, tasks load by name from the Hugging Face hub. With --data-dir, any task that mteb
registers loads from local files (the hub is never contacted), found by the task's type in the first existing
folder of DATA_DIR/<type>/<TASK>, DATA_DIR/<TASK>, DATA_DIR/<task>, DATA_DIR/<task without type suffix>
(e.g. sts/STS14, scifact, banking77 for Banking77Classification). Files per type:
{layouts}
Multilingual tasks: one folder per hub subset inside (e.g. sts/STS17/en-en/test.jsonl). Also offline: the derived
clustering sets {derived} (clustering/*.jsonl).
A task whose files are missing is reported with the folders looked in and the files expected, before any
model runs.

Output: mteb's result JSON per task under --output-dir, plus summary.json and summary.md.
""".format(
    tables=", ".join(instruction_tables()),
    layouts="\n".join(f"  {kind}: {layout}" for kind, layout in LAYOUTS.items()), derived=", ".join(DERIVED)
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.mteb", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", required=True, help="engine file (NAME.onnx / NAME.plan with its sidecars) or a checkpoint folder")
    p.add_argument("--tasks", nargs="+", required=True, help="MTEB task names, e.g. STSBenchmark SciFact Banking77Classification")
    p.add_argument("--data-dir", type=Path, help="local data folder DATA_DIR (layouts above); omit to load from the hub")
    p.add_argument("--output-dir", type=Path, default=Path("results/mteb"), help="where result JSON goes. Default: results/mteb")
    p.add_argument("--instructions-for", help="instruction table (e.g. hkunlp/instructor-large) or 'none'. Default: by architecture")
    p.add_argument("--batch-size", type=int, default=32, help="encode batch size. Default: 32")
    p.add_argument("--name", help="model name written into the results. Default: the engine's file or folder name")
    p.add_argument("--compare", type=Path, help="JSON {task: expected main score}: adds expected and delta columns to the summary")
    return p.parse_args(argv)


def load_tasks(names: list[str], data_dir: Path | None) -> list:
    """Tasks from the hub by name, or from local files, read now so that a bad file stops the run before any model does."""
    import mteb

    if data_dir is None:
        return list(mteb.get_tasks(tasks=names))
    tasks = [offline_task(name, data_dir) for name in names]
    for task in tasks:
        task.load_data()
    return tasks


def summarize(results: list, model: InstructorMTEBModel, expected: dict[str, float]) -> list[dict]:
    rows = []
    for res in results:
        split = "test" if "test" in res.scores else next(iter(res.scores))
        entry = res.scores[split][0]
        row = {
            "task": res.task_name,
            "split": split,
            "metric": res.task.metadata.main_score,
            "score": entry["main_score"],
            "instructions": model.used.get(res.task_name, {}),
        }
        if res.task_name in expected:
            row["expected"] = expected[res.task_name]
            row["delta"] = row["score"] - expected[res.task_name]
        rows.append(row)
    return rows


def markdown(rows: list[dict], header: dict) -> str:
    has_expected = any("expected" in r for r in rows)
    cols = ["task", "metric", "score"] + (["expected", "delta"] if has_expected else [])
    lines = [
        f"Engine: `{header['engine']}` ({header['kind']}, {header['precision']}), instructions: {header['instructions_for']}",
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "---|" * len(cols),
    ]
    for r in rows:
        cells = [r["task"], r["metric"], f"{r['score']:.4f}"]
        if has_expected:
            cells += [f"{r['expected']:.4f}", f"{r['delta']:+.4f}"] if "expected" in r else ["", ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import mteb

    try:
        tasks = load_tasks(args.tasks, args.data_dir)
        encoder, info = load_encoder(args.engine)
        table = args.instructions_for or default_table(info.get("architecture"))
        instructions = Instructions(table)
    except (DataError, ValueError, RuntimeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    missing = [t.metadata.name for t in tasks if not instructions.has(t.metadata.name)]
    if missing:
        print(f"note: table {table} has no instruction for {missing}: encoding their plain text", file=sys.stderr)
    name = args.name or f"local/{Path(args.engine).name}"
    framework = "PyTorch" if info["kind"] == "pytorch" else "ONNX"
    model = InstructorMTEBModel(encoder, instructions, name, info.get("embedding_dim"), args.batch_size, framework)
    out = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for task in tasks:  # one at a time, so each task's JSON is on disk as soon as it is scored
        result = mteb.evaluate(model, task, cache=None, encode_kwargs={"batch_size": args.batch_size}, show_progress_bar=True)
        for res in result.task_results:
            res.to_disk(out / f"{res.task_name}.json")
            results.append(res)
    expected = json.loads(args.compare.read_text(encoding="utf-8")) if args.compare else {}
    header = {"engine": str(args.engine), **info, "instructions_for": table, "batch_size": args.batch_size, "mteb_version": mteb.__version__}
    rows = summarize(results, model, expected)
    write_json(out / "summary.json", {**header, "results": rows})
    (out / "summary.md").write_text(markdown(rows, header), encoding="utf-8")
    print(markdown(rows, header))
    return 0


if __name__ == "__main__":
    sys.exit(main())
