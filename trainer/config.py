"""``TrainJob``: what a training run is asked to do, from ``python -m trainer``'s flags (upstream train.py's names
where it has them) or from Python; every default is written here once."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

DESCRIPTION = """\
Train an INSTRUCTOR embedder on MEDI-format data with the upstream contrastive loss.

Every optimizer step takes one global batch (per_device_train_batch_size x number of processes) of ONE task,
split across processes; embeddings are gathered so each query sees the hard negatives of the whole global
batch. Launch N processes with `accelerate launch --multi_gpu --num_processes N -m trainer ...` (GPUs: NCCL;
a machine without CUDA: N CPU processes over gloo) or `torchrun --nproc_per_node N -m trainer ...`.
The output folder receives the trained model (hkunlp sentence-transformers layout), checkpoints/checkpoint-N
(model, optimizer, scheduler, RNG and data position; no pickles), train_log.jsonl (loss, lr, throughput per step) and loss_curve.png.
"""

EPILOG = """\
example:
  python -m trainer --model_name_or_path gtr-t5-large --data medi-data.json --output_dir out \\
      --per_device_train_batch_size 64 --grad_cache_chunk_size 32 --max_steps 20000 --save_steps 500
  python -m trainer ... --resume_from_checkpoint latest      # after a crash or kill: same final weights
"""


@dataclass(frozen=True)
class TrainJob:
    model_name_or_path: str
    output_dir: str
    data: str
    max_source_length: int = 512
    pad_to_max_length: bool = False
    overwrite_output_dir: bool = False
    num_train_epochs: float = 3.0
    max_steps: int = -1
    per_device_train_batch_size: int = 8
    learning_rate: float = 2e-5
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 42
    cl_temperature: float = 0.1
    grad_cache_chunk_size: int = 0
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    save_steps: int = 500
    resume_from_checkpoint: str | None = None

    def problems(self) -> list[str]:
        checks = [
            (self.per_device_train_batch_size >= 1, "--per_device_train_batch_size must be >= 1"),
            (self.cl_temperature > 0, "--cl_temperature must be > 0"),
            (self.max_source_length >= 2, "--max_source_length must be >= 2"),
            (self.save_steps >= 1, "--save_steps must be >= 1"),
            (self.grad_cache_chunk_size >= 0, "--grad_cache_chunk_size must be >= 0"),
            (0 <= self.warmup_ratio <= 1, "--warmup_ratio must be between 0 and 1"),
            (self.max_steps > 0 or self.num_train_epochs > 0, "give --max_steps > 0 or --num_train_epochs > 0"),
            (self.mixed_precision in MIXED_PRECISION, f"--mixed_precision must be one of {', '.join(MIXED_PRECISION)}"),
        ]
        return [message for ok, message in checks if not ok]


MIXED_PRECISION = ("no", "bf16", "fp16")


def build_parser() -> argparse.ArgumentParser:
    d = TrainJob  # every default comes from the job's fields
    p = argparse.ArgumentParser(
        prog="python -m trainer", description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    io = p.add_argument_group("model and data")
    io.add_argument("--model_name_or_path", required=True, help="local sentence-transformers folder to start from (e.g. gtr-t5-large, an hkunlp INSTRUCTOR, all-MiniLM-L6-v2)")
    io.add_argument("--output_dir", required=True, help="where the trained model, checkpoints/, train_log.jsonl and loss_curve.png go; "
                    "never the --model_name_or_path folder, and one already holding a model needs --overwrite_output_dir")
    io.add_argument(
        "--data", "--cache_dir", dest="data", required=True,
        help="MEDI data: a JSON list or JSON-lines file of {query, pos, neg: [instruction, text], task_name or task_id}, "
        "or a folder holding medi-data.json (upstream's --cache_dir) or one .json/.jsonl file",
    )
    io.add_argument("--max_source_length", type=int, default=d.max_source_length, help=f"tokens per text after truncation (keeps the final special token). Default: {d.max_source_length}")
    io.add_argument(
        "--pad_to_max_length", action="store_true",
        help="pad every text to --max_source_length as upstream does; by default each chunk is padded to its longest text "
        "(the same embeddings up to float noise, and faster)",
    )
    io.add_argument("--overwrite_output_dir", action="store_true", help="start afresh even if --output_dir already holds a model or checkpoints")

    sched = p.add_argument_group("schedule")
    sched.add_argument("--num_train_epochs", type=float, default=d.num_train_epochs, help=f"epochs over the full single-task batches (fractions allowed). Default: {d.num_train_epochs:g}")
    sched.add_argument("--max_steps", type=int, default=d.max_steps, help=f"optimizer steps to run; overrides --num_train_epochs when > 0. Default: {d.max_steps}")
    sched.add_argument("--per_device_train_batch_size", type=int, default=d.per_device_train_batch_size, help=f"examples (query, pos, neg triplets) per process per step. Default: {d.per_device_train_batch_size}")
    sched.add_argument("--learning_rate", type=float, default=d.learning_rate, help=f"peak AdamW learning rate. Default: {d.learning_rate:g}")
    sched.add_argument("--warmup_ratio", type=float, default=d.warmup_ratio, help=f"fraction of the steps with linear warmup; then linear decay to 0. Default: {d.warmup_ratio:g}")
    sched.add_argument("--weight_decay", type=float, default=d.weight_decay, help=f"AdamW weight decay. Default: {d.weight_decay:g}")
    sched.add_argument("--max_grad_norm", type=float, default=d.max_grad_norm, help=f"gradient clipping norm (0 turns clipping off). Default: {d.max_grad_norm:g}, as upstream's HF Trainer")
    sched.add_argument("--seed", type=int, default=d.seed, help=f"seed for the batch order, dropout and initial RNG state. Default: {d.seed}")

    loss = p.add_argument_group("loss and memory")
    loss.add_argument("--cl_temperature", type=float, default=d.cl_temperature, help=f"temperature tau of cos/tau (the published command uses 0.1; the earlier README 0.01). Default: {d.cl_temperature:g}")
    loss.add_argument(
        "--grad_cache_chunk_size", type=int, default=d.grad_cache_chunk_size,
        help="GradCache: embed at most this many texts at a time (each example has 3 texts); the loss still sees the whole "
        f"batch, with exact gradients. Use it when per_device_train_batch_size does not fit in memory. 0 = off. Default: {d.grad_cache_chunk_size}",
    )
    loss.add_argument("--mixed_precision", choices=MIXED_PRECISION, default=d.mixed_precision, help=f"autocast precision of the encoder (the loss is fp32). Default: {d.mixed_precision}")
    loss.add_argument("--gradient_checkpointing", action="store_true", help="recompute encoder activations in backward to save memory")

    ck = p.add_argument_group("checkpoints")
    ck.add_argument("--save_steps", type=int, default=d.save_steps, help=f"save the training state (model, optimizer, scheduler, RNG, data position; no pickles) every N steps. Default: {d.save_steps}")
    ck.add_argument("--resume_from_checkpoint", help="a checkpoint folder, or 'latest' for the newest in OUTPUT_DIR/checkpoints")
    return p


def parse_job(argv: list[str] | None = None) -> TrainJob:
    """The command line as a ``TrainJob``; bad values exit 2 with argparse's usage message."""
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    job = TrainJob(**{f.name: args[f.name] for f in dataclasses.fields(TrainJob)})
    problems = job.problems()
    if problems:
        parser.error("; ".join(problems))
    return job
