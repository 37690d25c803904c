"""``python -m bench.quality.mteb --engine X --tasks ...|--category ...``: MTEB scores of an engine or checkpoint, by mteb's
own evaluators."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from typing import TYPE_CHECKING

from bench.common import write_json
from bench.quality import cli
from bench.quality.datafiles import DataError, MissingData
from bench.quality.encoders import default_table, load_encoder
from bench.quality.hub import NO_HUB_HINT, HubUnreachable, require_hub
from bench.quality.mteb.tables import ALL, DERIVED_NAMES, LAYOUTS, categories, category_of, dataset_of, instruction_tables

if TYPE_CHECKING:  # mteb and what needs it load only when a run starts: the checks before it answer at once
    from bench.quality.mteb.categories import Missing
    from bench.quality.mteb.model import InstructorMTEBModel

DESCRIPTION = """\
Evaluate an engine bundle (.onnx / .plan, run by runtime.Encoder) or a checkpoint folder (run by the PyTorch
reference model) on MTEB tasks with mteb's own evaluators.

Instructions: --instructions-for picks one table of bench/quality/mteb_instructions.json (the INSTRUCTOR evaluation
tables: {tables});
retrieval and reranking tasks get a query and a corpus instruction, and corpus documents are (title + " " + text).strip(). 'none' encodes plain strings, as
sentence-transformers models such as all-MiniLM-L6-v2 expect. Default: hkunlp/instructor-large for T5
(INSTRUCTOR) models, none for any other architecture.

Tasks: --tasks names them; --category retrieval|sts|classification|clustering|pair_classification|reranking|
summarization|all runs every task of the INSTRUCTOR paper's English MTEB in that category ({ncat} datasets in all)
that DATA_DIR holds, as upstream's evaluate_model.py ran them (the English subset of a multilingual task, the
test split where there is one), and names the tasks it does not find.

Data: without --data-dir, tasks load by name from the Hugging Face hub (checked first: with no hub in reach the run
stops at once, exit 3, saying what to pass). With --data-dir, any task that mteb
registers loads from local files (the hub is never contacted), found by the task's type in the first existing
folder of DATA_DIR/<type>/<TASK>, DATA_DIR/<TASK>, DATA_DIR/<task>, DATA_DIR/<task without type suffix>
(e.g. sts/STS14, scifact, banking77 for Banking77Classification). Files per type:
{layouts}
Multilingual tasks: one folder per hub subset inside (e.g. sts/STS17/en-en/test.jsonl). Also offline: the derived
clustering sets {derived} (clustering/*.jsonl). python -m bench.quality.fetch_data DATA_DIR --tasks ... writes this
layout from the hub's datasets, where the hub is reachable.
A task whose files are missing is reported with the folders looked in and the files expected, before any
model runs.

Output: mteb's result JSON per task under --output-dir, plus summary.json and summary.md: one table of every task
with its category and main score, the tasks not run and why, and (with --category) each category's average.

Upstream evaluate_model.py's flags --model_name, --task_name, --output_dir, --cache_dir, --batch_size and --prompt
are accepted as --engine, --tasks, --output-dir, --cache-dir, --batch-size and --instructions-for.
""".format(
    ncat=len({dataset_of(n) for names in categories().values() for n in names}),
    tables=", ".join(instruction_tables()),
    layouts="\n".join(f"  {kind}: {layout}" for kind, layout in LAYOUTS.items()), derived=", ".join(DERIVED_NAMES)
)


UNKNOWN_HINT = (
    "see --help; docs/compatibility.md maps upstream evaluate_model.py's flags (--result_file has no counterpart: results "
    "go to --output-dir; nor has --split: each task runs its own evaluation splits, and with --category the test split, "
    "upstream's default)"
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; upstream evaluate_model.py's spellings of the same options are accepted too."""
    p = cli.parser("python -m bench.quality.mteb", DESCRIPTION)
    p.add_argument("--engine", "--model_name", required=True,
                   help="engine file (NAME.onnx / NAME.plan with its sidecars), a checkpoint folder, or a hub name already "
                   "downloaded (into --cache-dir or the default caches; nothing is downloaded)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--tasks", "--task_name", nargs="+", help="MTEB task names, e.g. STSBenchmark SciFact Banking77Classification")
    which.add_argument("--category", choices=[*categories(), ALL], help="every task of this category of the paper's English MTEB found in --data-dir")
    p.add_argument("--data-dir", type=Path, help="local data folder DATA_DIR (layouts above); omit to load --tasks from the hub")
    p.add_argument("--output-dir", "--output_dir", type=Path, default=Path("results/mteb"), help="where result JSON goes. Default: results/mteb")
    p.add_argument("--cache-dir", "--cache_dir", type=Path, help="where a hub name given as --engine was downloaded (upstream's --cache_dir)")
    p.add_argument("--instructions-for", "--prompt", help="instruction table (e.g. hkunlp/instructor-large) or 'none'. Default: by architecture")
    p.add_argument("--batch-size", "--batch_size", type=int, default=32, help="encode batch size. Default: 32")
    p.add_argument("--precision", default="auto",
                   help="the engine of a --precision auto bundle to evaluate (fp32, bf16, int8 or a name such as openvino-bf16). "
                   "Default: auto, the one this CPU runs")
    p.add_argument("--name", help="model name written into the results. Default: the engine's file or folder name")
    p.add_argument("--compare", type=Path, help="JSON {task: expected main score}: adds expected and delta columns to the summary")
    args, unknown = p.parse_known_args(argv)
    if unknown:
        p.error(f"unrecognized arguments: {' '.join(unknown)}; {UNKNOWN_HINT}")
    if args.category and args.data_dir is None:
        p.error("--category needs --data-dir DATA_DIR: its tasks are looked for there")
    return args


def load_tasks(names: list[str], data_dir: Path | None) -> list:
    """Tasks from the hub by name, or from local files, read now so that a bad file or an unreachable hub stops the
    run before any model loads."""
    import mteb

    from bench.quality.mteb.offline import offline_task

    if data_dir is None:
        try:
            tasks = list(mteb.get_tasks(tasks=names))
        except KeyError as exc:
            raise MissingData(f"{exc.args[0] if exc.args else exc}") from exc
        for task in tasks:
            try:
                task.load_data()
            except OSError as exc:  # ConnectionError, the hub's HTTP errors, a dataset missing from the offline cache
                dataset = task.metadata.dataset.get("path")
                why = " ".join(str(exc).split())[:300]
                raise HubUnreachable(f"{task.metadata.name}: {dataset} could not be loaded from the hub ({why}): {NO_HUB_HINT}") from exc
        return tasks
    tasks = [offline_task(name, data_dir) for name in names]
    for task in tasks:
        task.load_data()
    return tasks


def summarize(results: list, model: InstructorMTEBModel, expected: dict[str, float]) -> list[dict]:
    """One row per task result: its category, split, main metric and score, the instructions used."""
    rows = []
    for res in results:
        split = "test" if "test" in res.scores else next(iter(res.scores))
        entry = res.scores[split][0]
        row = {
            "task": res.task_name,
            "category": category_of(res.task_name) or res.task.metadata.type.lower(),
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


def markdown(rows: list[dict], header: dict, not_run: list[Missing] = (), means: dict[str, dict] | None = None) -> str:
    """The summary table: every task scored, every task not run, then each category's average."""
    has_expected = any("expected" in r for r in rows)
    cols = ["category", "task", "metric", "score"] + (["expected", "delta"] if has_expected else [])
    lines = [
        f"Engine: `{header['engine']}` ({header['kind']}, {header['precision']}), instructions: {header['instructions_for']}",
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "---|" * len(cols),
    ]
    blank = [""] * (len(cols) - 4)
    for r in rows:
        cells = [r["category"], r["task"], r["metric"], f"{r['score']:.4f}"]
        if has_expected:
            cells += [f"{r['expected']:.4f}", f"{r['delta']:+.4f}"] if "expected" in r else ["", ""]
        lines.append("| " + " | ".join(cells) + " |")
    for m in not_run:
        status = "failed: bad data files (see summary.json)" if m.failed else "not run: no files in the data folder"
        lines.append("| " + " | ".join([m.category, m.task, "", status, *blank]) + " |")
    for cat, mean in (means or {}).items():
        score = "" if mean["score"] is None else f"{mean['score']:.4f}"
        lines.append("| " + " | ".join([cat, f"**average** ({mean['datasets_run']} of {mean['datasets']} datasets)", "", score, *blank]) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run the evaluation; 0 when every task ran, 1 when a task's files failed to read (or a file is malformed), 2 bad
    usage (a task or file not found), 3 the environment (the hub out of reach, a missing package), 4 internal."""
    args = parse_args(argv)
    return cli.run(lambda: evaluate(args), "bench.quality.mteb", args.debug)


def evaluate(args: argparse.Namespace) -> int:
    """The run of ``main``: tasks first (local files, or the hub if it answers), then the model, then each task."""
    if args.data_dir is None:
        require_hub("--tasks without --data-dir")
    import mteb

    from bench.quality.mteb.categories import Missing, averages, find_category
    from bench.quality.mteb.model import Instructions, InstructorMTEBModel

    if args.category:
        tasks, not_run = find_category(args.category, args.data_dir)
        if not tasks:
            raise MissingData(f"no task of --category {args.category} has files under {args.data_dir}; e.g. {not_run[0].reason}")
    else:
        tasks, not_run = load_tasks(args.tasks, args.data_dir), []
    encoder, info = load_encoder(args.engine, args.cache_dir, args.precision)
    table = args.instructions_for or default_table(info.get("architecture"))
    instructions = Instructions(table)
    if not_run:
        print(
            f"note: --category {args.category}: {len(tasks)} of {len(tasks) + len(not_run)} tasks have files under "
            f"{args.data_dir}; not run: {', '.join(m.task for m in not_run)} (summary.json says what each lacks)",
            file=sys.stderr,
        )
    missing = [t.metadata.name for t in tasks if not instructions.has(t.metadata.name)]
    if missing:
        print(f"note: table {table} has no instruction for {missing}: encoding their plain text", file=sys.stderr)
    name = args.name or f"local/{Path(args.engine).name}"
    framework = "PyTorch" if info["kind"] == "pytorch" else "ONNX"
    model = InstructorMTEBModel(encoder, instructions, name, info.get("embedding_dim"), args.batch_size, framework)
    out = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    results, failed = [], []
    for task in tasks:  # one at a time, so each task's JSON is on disk as soon as it is scored
        try:
            result = mteb.evaluate(model, task, cache=None, encode_kwargs={"batch_size": args.batch_size}, show_progress_bar=True)
        except DataError as exc:  # --category reads each task's files when it runs: a bad one stops only that task
            task_name = task.metadata.name
            print(f"error: {task_name}: {exc}", file=sys.stderr)
            failed.append(Missing(task_name, category_of(task_name) or task.metadata.type.lower(), str(exc), failed=True))
            continue
        for res in result.task_results:
            res.to_disk(out / f"{res.task_name}.json")
            results.append(res)
    expected = json.loads(args.compare.read_text(encoding="utf-8")) if args.compare else {}
    header = {"engine": str(args.engine), **info, "instructions_for": table, "batch_size": args.batch_size, "mteb_version": mteb.__version__}
    rows = summarize(results, model, expected)
    not_run = [*failed, *not_run]
    means = averages(rows, args.category) if args.category else None
    summary = {**header, "category": args.category, "results": rows, "not_run": [dataclasses.asdict(m) for m in not_run]}
    write_json(out / "summary.json", {**summary, "averages": means} if means else summary)
    (out / "summary.md").write_text(markdown(rows, header, not_run, means), encoding="utf-8")
    print(markdown(rows, header, not_run, means))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
