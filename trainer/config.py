"""Command-line options of ``python -m trainer``, under upstream train.py's names where it has them."""

from __future__ import annotations

import argparse

DESCRIPTION = """\
Train an INSTRUCTOR embedder on MEDI-format data with the upstream contrastive loss.

Every optimizer step takes one global batch (per_device_train_batch_size x number of processes) of ONE task,
split across processes; embeddings are gathered so each query sees the hard negatives of the whole global
batch. Launch N processes with `accelerate launch --multi_gpu --num_processes N -m trainer ...` (GPUs: NCCL;
a machine without CUDA: N CPU processes over gloo) or `torchrun --nproc_per_node N -m trainer ...`.
The output folder receives the trained model (hkunlp sentence-transformers layout), checkpoints/checkpoint-N
(Accelerate state), train_log.jsonl (loss, lr, throughput per step) and loss_curve.png.
"""

EPILOG = """\
example:
  python -m trainer --model_name_or_path gtr-t5-large --data medi-data.json --output_dir out \\
      --per_device_train_batch_size 64 --grad_cache_chunk_size 32 --max_steps 20000 --save_steps 500
  python -m trainer ... --resume_from_checkpoint latest      # after a crash or kill: same final weights
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m trainer", description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    io = p.add_argument_group("model and data")
    io.add_argument("--model_name_or_path", required=True, help="local sentence-transformers folder to start from (e.g. gtr-t5-large, an hkunlp INSTRUCTOR, all-MiniLM-L6-v2)")
    io.add_argument("--output_dir", required=True, help="where the trained model, checkpoints/, train_log.jsonl and loss_curve.png go")
    io.add_argument(
        "--data", "--cache_dir", dest="data", required=True,
        help="MEDI data: a JSON list or JSON-lines file of {query, pos, neg: [instruction, text], task_name or task_id}, "
        "or a folder holding medi-data.json (upstream's --cache_dir) or one .json/.jsonl file",
    )
    io.add_argument("--max_source_length", type=int, default=512, help="tokens per text after truncation (keeps the final special token). Default: 512")
    io.add_argument(
        "--pad_to_max_length", action="store_true",
        help="pad every text to --max_source_length as upstream does; by default each chunk is padded to its longest text "
        "(the same embeddings up to float noise, and faster)",
    )
    io.add_argument("--overwrite_output_dir", action="store_true", help="start afresh even if --output_dir already holds checkpoints")

    sched = p.add_argument_group("schedule")
    sched.add_argument("--num_train_epochs", type=float, default=3.0, help="epochs over the full single-task batches (fractions allowed). Default: 3")
    sched.add_argument("--max_steps", type=int, default=-1, help="optimizer steps to run; overrides --num_train_epochs when > 0. Default: -1")
    sched.add_argument("--per_device_train_batch_size", type=int, default=8, help="examples (query, pos, neg triplets) per process per step. Default: 8")
    sched.add_argument("--learning_rate", type=float, default=2e-5, help="peak AdamW learning rate. Default: 2e-5")
    sched.add_argument("--warmup_ratio", type=float, default=0.1, help="fraction of the steps with linear warmup; then linear decay to 0. Default: 0.1")
    sched.add_argument("--weight_decay", type=float, default=0.0, help="AdamW weight decay. Default: 0")
    sched.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient clipping norm (0 turns clipping off). Default: 1.0, as upstream's HF Trainer")
    sched.add_argument("--seed", type=int, default=42, help="seed for the batch order, dropout and initial RNG state. Default: 42")

    loss = p.add_argument_group("loss and memory")
    loss.add_argument("--cl_temperature", type=float, default=0.1, help="temperature tau of cos/tau (the published command uses 0.1; the earlier README 0.01). Default: 0.1")
    loss.add_argument(
        "--grad_cache_chunk_size", type=int, default=0,
        help="GradCache: embed at most this many texts at a time (each example has 3 texts); the loss still sees the whole "
        "batch, with exact gradients. Use it when per_device_train_batch_size does not fit in memory. 0 = off. Default: 0",
    )
    loss.add_argument("--mixed_precision", choices=("no", "bf16", "fp16"), default="no", help="autocast precision of the encoder (the loss is fp32). Default: no")
    loss.add_argument("--gradient_checkpointing", action="store_true", help="recompute encoder activations in backward to save memory")

    ck = p.add_argument_group("checkpoints")
    ck.add_argument("--save_steps", type=int, default=500, help="save the Accelerate state (model, optimizer, scheduler, RNG, data position) every N steps. Default: 500")
    ck.add_argument("--resume_from_checkpoint", help="a checkpoint folder, or 'latest' for the newest in OUTPUT_DIR/checkpoints")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    checks = [
        (args.per_device_train_batch_size >= 1, "--per_device_train_batch_size must be >= 1"),
        (args.cl_temperature > 0, "--cl_temperature must be > 0"),
        (args.max_source_length >= 2, "--max_source_length must be >= 2"),
        (args.save_steps >= 1, "--save_steps must be >= 1"),
        (args.grad_cache_chunk_size >= 0, "--grad_cache_chunk_size must be >= 0"),
        (0 <= args.warmup_ratio <= 1, "--warmup_ratio must be between 0 and 1"),
        (args.max_steps > 0 or args.num_train_epochs > 0, "give --max_steps > 0 or --num_train_epochs > 0"),
    ]
    for ok, message in checks:
        if not ok:
            parser.error(message)
    return args
