"""``python -m bench.quality.prompt_retrieval``: upstream INSTRUCTOR's demonstration selection, optionally scored by a local LM."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from bench.common import write_json
from bench.quality import cli
from bench.quality.encoders import SentenceEncoder, load_encoder
from bench.quality.prompt_retrieval import tasks as task_defs
from bench.quality.prompt_retrieval.select import cosine_scores, select

DESCRIPTION = """\
Prompt retrieval, the demonstration-selection step of INSTRUCTOR's evaluation (upstream
evaluation/prompt_retrieval, two_steps.prompt_retrieval and the per-task scripts): embed the annotated pool and
each test input with the task's instruction, rank the pool by cosine, and pack the most similar examples into a
prompt under the task's token budget, most similar last. With --lm, a local causal LM scores each test
example's answer options after its demonstrations (upstream's MetaICL "direct" method) and accuracy is reported.

Tasks:
  answerability  MultiRC answerability (Natural-Instructions task050; upstream main_answerbility.py): DATA_DIR
                 [/prompt_retrieval]/multric_answerability.json; 256 tests, a 3000-example pool (seeded as upstream),
                 budget 1000 tokens, options True/False.
  geoquery       GeoQuery text-to-SQL (main_geo.py): geoquery_train.json is the pool, 256 of geoquery_eval.json are
                 tested, budget 3800; selection and prompts only (no database schema block, no SQL scoring here).
  jsonl          --data-dir FOLDER with pool.jsonl and test.jsonl, rows {"input", "output"} (optional "id", and
                 "embed": the text to embed, default the input); two_steps.prompt_retrieval rules: budget 1000,
                 examples over 250 tokens skipped, exact duplicates skipped; options: --options or the distinct
                 outputs of the pool; instruction: --instruction.

Token counts come from --tokenizer (default: the --lm folder's tokenizer; upstream counted with GPT-2's).
--instructions task none runs both the task's instruction and plain text in one invocation, for comparison.

Output (--output-dir): prompts-<mode>.jsonl (per test: the selected pool ids in prompt order, their cosines, the
prompt's token count, whether each demonstration shares the test's group, and with --lm the prediction and option
losses), summary.json and summary.md. Diagnostics without an LM: demo agreement (the share of a prompt's
demonstrations in the test's group: same label; GeoQuery: same SQL template) and nearest agreement (the same for
the most similar demonstration), averaged over the tests.
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = cli.parser("python -m bench.quality.prompt_retrieval", DESCRIPTION)
    p.add_argument("--task", required=True, choices=["answerability", "geoquery", "jsonl"], help="which task (see above)")
    p.add_argument("--data-dir", type=Path, required=True, help="DATA_DIR (upstream tasks) or the jsonl task's folder")
    p.add_argument("--engine", required=True, help="embedder: engine file (.onnx / .plan) or checkpoint folder")
    p.add_argument("--tokenizer", help="tokenizer folder for the token budget. Default: the --lm folder")
    p.add_argument("--lm", help="a local transformers causal-LM folder to score the answer options (optional)")
    p.add_argument("--instructions", nargs="+", choices=["task", "none"], default=["task"], help="embed with the task's instruction, plain text, or both. Default: task")
    p.add_argument("--instruction", help="jsonl task: the instruction for --instructions task")
    p.add_argument("--options", nargs="+", help="jsonl task: the answer options. Default: the pool's distinct outputs")
    p.add_argument("--seed", type=int, default=0, help="upstream's --seed for the test/pool sampling. Default: 0")
    p.add_argument("--limit", type=int, help="score only the first N test examples (a quick run)")
    p.add_argument("--batch-size", type=int, default=32, help="embedding batch size. Default: 32")
    p.add_argument("--output-dir", type=Path, default=Path("results/prompt_retrieval"), help="Default: results/prompt_retrieval")
    return p.parse_args(argv)


def load_task(args: argparse.Namespace) -> task_defs.Task:
    if args.task == "answerability":
        task = task_defs.answerability(args.data_dir, args.seed)
    elif args.task == "geoquery":
        task = task_defs.geoquery(args.data_dir, args.seed)
    else:
        task = task_defs.jsonl_task(args.data_dir, args.instruction, args.options)
    if args.limit:
        task.tests = task.tests[: args.limit]
    return task


def embed(encoder: SentenceEncoder, texts: list[str], instruction: str | None, center: bool, batch_size: int) -> np.ndarray:
    """float32 embeddings, ``[instruction, text]`` when instructed; centred by their own mean when ``center``."""
    items = texts if instruction is None else [[instruction, t] for t in texts]
    vecs = np.asarray(encoder.encode(items, batch_size=batch_size, show_progress_bar=True, convert_to_numpy=True), dtype=np.float32)
    return vecs - vecs.mean(axis=0, keepdims=True) if center else vecs


def token_costs(task: task_defs.Task, count: Any) -> tuple[np.ndarray, np.ndarray]:
    """Each pool example's token cost and each test's starting prompt length, counted as the task's script does."""
    if task.joined_cost:
        pool = [count(e.demo_input + e.demo_output) for e in task.pool]
    else:
        pool = [count(e.demo_input) + count(e.demo_output) for e in task.pool]
    prefix = count(task.prefix) if task.prefix else 0
    return np.asarray(pool, dtype=np.int64), np.asarray([prefix + count(e.query) for e in task.tests], dtype=np.int64)


def run_mode(task: task_defs.Task, encoder: SentenceEncoder, instruction: str | None, costs: np.ndarray, starts: np.ndarray, lm: Any, batch_size: int) -> tuple[list[dict], dict]:
    pool_vecs = embed(encoder, [e.embed_text for e in task.pool], instruction, True, batch_size)
    test_vecs = embed(encoder, [e.embed_text for e in task.tests], instruction, task.center_tests, batch_size)
    rows = []
    for test, vec, start in tqdm(list(zip(task.tests, test_vecs, starts)), desc="select"):
        scores = cosine_scores(vec, pool_vecs)
        chosen = select(scores, costs, int(start), task.budget)
        row: dict[str, Any] = {
            "id": test.id,
            "selected": [task.pool[i].id for i in chosen],
            "cosines": [float(scores[i]) for i in chosen],
            "prompt_tokens": int(start + costs[chosen].sum()),
            "answer": test.answer,
            "agreement": [task.pool[i].group == test.group for i in chosen],
        }
        if lm is not None and task.options:
            demos = [(task.pool[i].demo_input, task.pool[i].demo_output) for i in chosen]
            row["prediction"], row["option_losses"] = lm.predict(demos, test.query, task.options)
        rows.append(row)
    stats: dict[str, Any] = {
        "tests": len(rows),
        "pool": len(task.pool),
        "demos_mean": statistics.fmean(len(r["selected"]) for r in rows),
        "demos_median": statistics.median(len(r["selected"]) for r in rows),
        "prompt_tokens_median": statistics.median(r["prompt_tokens"] for r in rows),
    }
    with_demos = [r["agreement"] for r in rows if r["agreement"]]
    if with_demos:
        stats["demo_agreement"] = statistics.fmean(statistics.fmean(a) for a in with_demos)
        stats["nearest_agreement"] = statistics.fmean(a[-1] for a in with_demos)
    if any("prediction" in r for r in rows):
        stats["accuracy"] = statistics.fmean(r["prediction"] == r["answer"] for r in rows)
    return rows, stats


def markdown(summary: dict[str, Any]) -> str:
    cols = ["mode", "instruction", "tests", "demos (mean)", "prompt tokens (median)", "demo agreement", "nearest agreement", "accuracy"]
    lines = [f"Task `{summary['task']}` ({summary['source']}), embedder `{summary['engine']}`, LM: {summary['lm'] or 'none'}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for mode, s in summary["modes"].items():
        cells = [mode, f"`{s['instruction']}`" if s["instruction"] else "(none)", str(s["tests"]), f"{s['demos_mean']:.1f}", f"{s['prompt_tokens_median']:.0f}"]
        cells += [f"{s[k]:.3f}" if k in s else "" for k in ("demo_agreement", "nearest_agreement", "accuracy")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return cli.run(lambda: evaluate(args), "bench.quality.prompt_retrieval", args.debug)


def evaluate(args: argparse.Namespace) -> int:
    """The run of ``main``: the task's files, the tokenizer and the embedder first, then each mode."""
    tokenizer_path = args.tokenizer or args.lm
    if tokenizer_path is None:
        raise ValueError("the token budget needs a tokenizer: give --lm PATH or --tokenizer PATH (upstream counted with GPT-2's)")
    task = load_task(args)
    if "task" in args.instructions and task.instruction is None:
        raise ValueError("--instructions task needs --instruction STR for a jsonl task")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_path))
    encoder, info = load_encoder(args.engine)
    lm = None
    if args.lm:
        from bench.quality.prompt_retrieval.lm import CausalLMScorer

        lm = CausalLMScorer(args.lm)
    if lm is not None and not task.options:
        print(f"note: {task.name} is a generation task; --lm scoring covers answer-option tasks only: selection only", file=sys.stderr)
    costs, starts = token_costs(task, lambda text: len(tokenizer(text)["input_ids"]))
    out = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {
        "task": task.name,
        "source": task.source,
        "engine": str(args.engine),
        "embedder": info,
        "tokenizer": str(tokenizer_path),
        "lm": args.lm,
        "lm_info": lm.describe() if lm is not None else None,
        "budget": vars(task.budget),
        "seed": args.seed,
        "modes": {},
    }
    for mode in args.instructions:
        instruction = task.instruction if mode == "task" else None
        rows, stats = run_mode(task, encoder, instruction, costs, starts, lm, args.batch_size)
        with open(out / f"prompts-{mode}.jsonl", "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)
        summary["modes"][mode] = {"instruction": instruction, **stats}
    write_json(out / "summary.json", summary)
    (out / "summary.md").write_text(markdown(summary), encoding="utf-8")
    print(markdown(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
