"""``python -m bench.quality.billboard``: Billboard correlations of an engine or checkpoint (upstream text_evaluation)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from bench.quality.billboard.data import FOLDERS, read_task
from bench.quality.billboard.score import TABLES, evaluate_task, instruction_for
from bench.common import write_json
from bench.quality import cli
from bench.quality.datafiles import DataError, MissingData
from bench.quality.encoders import default_table, load_encoder

DESCRIPTION = f"""\
Billboard, INSTRUCTOR's text-generation evaluation, as upstream evaluation/text_evaluation/main.py scores it:
every reference and every generated text (hyp) is embedded with the task's instruction; a hypothesis scores
its maximum cosine over its segment's references; the task's figure is the Pearson correlation of those
scores with the human judgments (human_score, THumB 1.0).

Engine: an engine file (.onnx / .plan, run by runtime.Encoder) or a checkpoint folder (PyTorch reference).
Instructions: --instructions-for picks upstream's per-model table ({', '.join(TABLES[1:])});
'none' encodes plain strings. Default: hkunlp/instructor-large for T5 (INSTRUCTOR) models, none for any other architecture.

Data (--data-dir DATA_DIR): per task, <folder>/<folder>_references.jsonl ({{seg_id, refs: [str]}} per segment)
and <folder>/<folder>_THumB-1.0.jsonl ({{seg_id, hyp, human_score}} per hypothesis), with folder
{', '.join(f'{t}={f}' for t, f in FOLDERS.items())}, directly in DATA_DIR or in DATA_DIR/billboard. A task whose
files are missing is reported as not run (the others still run).

Output (--output-dir): summary.json {{task: {{pearson, p_value, n, segments, references, instruction}}}} (a task
not run: {{status: "not run", reason}}), summary.md, and run.json (engine, table, batch size).
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = cli.parser("python -m bench.quality.billboard", DESCRIPTION)
    p.add_argument("--engine", required=True, help="engine file (NAME.onnx / NAME.plan with its sidecars) or a checkpoint folder")
    p.add_argument("--data-dir", type=Path, required=True, help="DATA_DIR holding the task folders (or DATA_DIR/billboard/...)")
    p.add_argument("--tasks", nargs="+", default=["mscoco", "cnndm"], choices=list(FOLDERS), help="Billboard tasks. Default: mscoco cnndm")
    p.add_argument("--instructions-for", choices=TABLES, help="instruction table, or 'none'. Default: by architecture")
    p.add_argument("--output-dir", type=Path, default=Path("results/billboard"), help="where results go. Default: results/billboard")
    p.add_argument("--batch-size", type=int, default=32, help="encode batch size. Default: 32")
    return p.parse_args(argv)


def markdown(summary: dict[str, Any], run: dict[str, Any]) -> str:
    lines = [
        f"Engine: `{run['engine']}` ({run['kind']}, {run['precision']}), instructions: {run['instructions_for']}",
        "",
        "| task | instruction | Pearson x 100 | hypotheses | segments |",
        "|---|---|---|---|---|",
    ]
    for task, row in summary.items():
        if "pearson" in row:
            instruction = f"`{row['instruction']}`" if row["instruction"] is not None else "(none)"
            lines.append(f"| {task} | {instruction} | {100 * row['pearson']:.1f} | {row['n']} | {row['segments']} |")
        else:
            lines.append(f"| {task} | | not run: {row['reason']} | | |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Exit 0 when every task ran or lacks files; 1 when a task's files are malformed (the others still run); 2 no
    task's files at all, or a bad engine; 3 the environment."""
    args = parse_args(argv)
    return cli.run(lambda: evaluate(args), "bench.quality.billboard", args.debug)


def evaluate(args: argparse.Namespace) -> int:
    """The run of ``main``: every task's files read first, then the model, then each task scored."""
    tasks, summary, malformed = {}, {}, []
    for name in args.tasks:
        try:
            tasks[name] = read_task(args.data_dir, name)
        except DataError as exc:  # a task without files, or with a malformed one, is not run; the others are
            print(f"{'note' if isinstance(exc, MissingData) else 'error'}: {name} not run: {exc}", file=sys.stderr)
            summary[name] = {"status": "not run", "reason": str(exc)}
            malformed += [] if isinstance(exc, MissingData) else [name]
    if not tasks:
        error = DataError if malformed else MissingData
        raise error(f"no Billboard task has readable files under {args.data_dir} (see the lines above)")
    encoder, info = load_encoder(args.engine)
    table = args.instructions_for or default_table(info.get("architecture"))
    for name, task in tasks.items():
        print(f"{name}: {len(task.references)} segments, {len(task.hyps)} hypotheses", file=sys.stderr)
        summary[name] = evaluate_task(encoder, task, instruction_for(table, name), args.batch_size)
    summary = {name: summary[name] for name in args.tasks}
    run = {"engine": str(args.engine), **info, "instructions_for": table, "batch_size": args.batch_size, "data": {n: [str(p) for p in t.files] for n, t in tasks.items()}}
    out = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "summary.json", summary)
    write_json(out / "run.json", run)
    (out / "summary.md").write_text(markdown(summary, run), encoding="utf-8")
    print(markdown(summary, run))
    return 1 if malformed else 0


if __name__ == "__main__":
    sys.exit(main())
