"""``TrainJob``: what a training run is asked to do, from ``python -m trainer``'s flags (upstream train.py's names
where it has them) or from Python; every default is written here once.

The command line also takes upstream ``train.py``'s as its README writes it, and a ``train.py args.json`` file:
the Hugging Face TrainingArguments this trainer implements are options here (``--fp16``/``--bf16``,
``--warmup_steps``, ``--adam_*``, ``--save_total_limit`` ...), and every other flag upstream defines is accepted,
noted or refused by ``trainer.upstream_args``. A flag neither knows is refused with where to look.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from dataclasses import dataclass

from trainer.upstream_args import add_bool, add_flags, check_flags, json_argv

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
examples:
  python -m trainer --model_name_or_path path/to/gtr-t5-large --data medi-data.json --output_dir out \\
      --per_device_train_batch_size 64 --grad_cache_chunk_size 32 --max_steps 20000 --save_steps 500
  python -m trainer ... --resume_from_checkpoint latest      # after a crash or kill: same final weights
  # upstream train.py's README line, as written (CACHE holds medi-data.json, and the model if it is a hub name)
  python -m trainer --model_name_or_path sentence-transformers/gtr-t5-large --output_dir out --cache_dir CACHE \\
      --max_source_length 512 --num_train_epochs 10 --save_steps 500 --cl_temperature 0.1 --warmup_ratio 0.1 \\
      --learning_rate 2e-5 --overwrite_output_dir
"""


@dataclass(frozen=True)
class TrainJob:
    model_name_or_path: str
    output_dir: str
    data: str
    cache_dir: str | None = None
    max_source_length: int = 512
    pad_to_max_length: bool = False
    overwrite_output_dir: bool = False
    num_train_epochs: float = 3.0
    max_steps: int = -1
    per_device_train_batch_size: int = 8
    learning_rate: float = 2e-5
    warmup_ratio: float = 0.1
    warmup_steps: int = 0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    seed: int = 42
    cl_temperature: float = 0.1
    grad_cache_chunk_size: int = 0
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    save_steps: int = 500
    save_total_limit: int | None = None
    resume_from_checkpoint: str | None = None

    def warmup_steps_of(self, total: int) -> int:
        """Warmup steps of a ``total``-step run: ``warmup_steps`` when > 0, else ``ceil(warmup_ratio x total)`` (HF's rule)."""
        return self.warmup_steps if self.warmup_steps > 0 else math.ceil(self.warmup_ratio * total)

    def problems(self) -> list[str]:
        """What is wrong with these settings, one message per problem (empty when they can run)."""
        checks = [
            (self.per_device_train_batch_size >= 1, "--per_device_train_batch_size must be >= 1"),
            (self.cl_temperature > 0, "--cl_temperature must be > 0"),
            (self.max_source_length >= 2, "--max_source_length must be >= 2"),
            (self.save_steps >= 1, "--save_steps must be >= 1"),
            (self.grad_cache_chunk_size >= 0, "--grad_cache_chunk_size must be >= 0"),
            (0 <= self.warmup_ratio <= 1, "--warmup_ratio must be between 0 and 1"),
            (self.warmup_steps >= 0, "--warmup_steps must be >= 0"),
            (0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1, "--adam_beta1 and --adam_beta2 must be in [0, 1)"),
            (self.adam_epsilon > 0, "--adam_epsilon must be > 0"),
            (self.save_total_limit is None or self.save_total_limit >= 1, "--save_total_limit must be >= 1"),
            (self.max_steps > 0 or self.num_train_epochs > 0, "give --max_steps > 0 or --num_train_epochs > 0"),
            (self.mixed_precision in MIXED_PRECISION, f"--mixed_precision must be one of {', '.join(MIXED_PRECISION)}"),
        ]
        return [message for ok, message in checks if not ok]


MIXED_PRECISION = ("no", "bf16", "fp16")


def build_parser() -> argparse.ArgumentParser:
    """``python -m trainer``'s options, then upstream train.py's other flags (``trainer.upstream_args``)."""
    d = TrainJob  # every default comes from the job's fields
    p = argparse.ArgumentParser(
        prog="python -m trainer", description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    io = p.add_argument_group("model and data")
    io.add_argument(
        "--model_name_or_path", required=True,
        help="sentence-transformers folder to start from (e.g. gtr-t5-large, an hkunlp INSTRUCTOR, all-MiniLM-L6-v2), or a hub "
        "name such as sentence-transformers/gtr-t5-large already downloaded into --cache_dir or the default caches: "
        "nothing is downloaded",
    )
    io.add_argument("--output_dir", required=True, help="where the trained model, checkpoints/, train_log.jsonl and loss_curve.png go; "
                    "never the --model_name_or_path folder, and one already holding a model needs --overwrite_output_dir")
    io.add_argument(
        "--data",
        help="MEDI data: a JSON list or JSON-lines file of {query, pos, neg: [instruction, text], task_name or task_id}, "
        "or a folder holding medi-data.json or one .json/.jsonl file. Default: --cache_dir",
    )
    io.add_argument(
        "--cache_dir",
        help="upstream train.py's folder holding medi-data.json (the data when --data is not given) and the downloaded "
        "models a hub name in --model_name_or_path is looked up in (sentence-transformers or Hugging Face cache layout)",
    )
    io.add_argument("--max_source_length", type=int, default=d.max_source_length, help=f"tokens per text after truncation (keeps the final special token). Default: {d.max_source_length}")
    add_bool(
        io, "pad_to_max_length",
        "pad every text to --max_source_length as upstream does; by default each chunk is padded to its longest text "
        "(the same embeddings up to float noise, and faster)",
    )
    add_bool(io, "overwrite_output_dir", "start afresh even if --output_dir already holds a model or checkpoints")

    sched = p.add_argument_group("schedule")
    sched.add_argument("--num_train_epochs", type=float, default=d.num_train_epochs, help=f"epochs over the full single-task batches (fractions allowed). Default: {d.num_train_epochs:g}")
    sched.add_argument("--max_steps", type=int, default=d.max_steps, help=f"optimizer steps to run; overrides --num_train_epochs when > 0. Default: {d.max_steps}")
    sched.add_argument("--per_device_train_batch_size", type=int, default=d.per_device_train_batch_size, help=f"examples (query, pos, neg triplets) per process per step. Default: {d.per_device_train_batch_size}")
    sched.add_argument("--learning_rate", type=float, default=d.learning_rate, help=f"peak AdamW learning rate. Default: {d.learning_rate:g}, upstream's published value")
    sched.add_argument("--warmup_ratio", type=float, default=d.warmup_ratio, help=f"fraction of the steps with linear warmup; then linear decay to 0. Default: {d.warmup_ratio:g}, upstream's published value")
    sched.add_argument("--warmup_steps", type=int, default=d.warmup_steps, help=f"warmup steps; overrides --warmup_ratio when > 0, as in Hugging Face's Trainer. Default: {d.warmup_steps}")
    sched.add_argument("--weight_decay", type=float, default=d.weight_decay, help=f"AdamW weight decay. Default: {d.weight_decay:g}")
    sched.add_argument("--adam_beta1", type=float, default=d.adam_beta1, help=f"AdamW beta1. Default: {d.adam_beta1:g}")
    sched.add_argument("--adam_beta2", type=float, default=d.adam_beta2, help=f"AdamW beta2. Default: {d.adam_beta2:g}")
    sched.add_argument("--adam_epsilon", type=float, default=d.adam_epsilon, help=f"AdamW epsilon. Default: {d.adam_epsilon:g}")
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
    add_bool(loss, "fp16", "the same as --mixed_precision fp16 (Hugging Face's flag)")
    add_bool(loss, "bf16", "the same as --mixed_precision bf16 (Hugging Face's flag)")
    add_bool(loss, "gradient_checkpointing", "recompute encoder activations in backward to save memory")

    ck = p.add_argument_group("checkpoints")
    ck.add_argument("--save_steps", type=int, default=d.save_steps, help=f"save the training state (model, optimizer, scheduler, RNG, data position; no pickles) every N steps. Default: {d.save_steps}")
    ck.add_argument("--save_total_limit", type=int, default=d.save_total_limit, help="keep only the newest N checkpoints (older ones are deleted). Default: keep all")
    ck.add_argument("--resume_from_checkpoint", help="a checkpoint folder, or 'latest' for the newest in OUTPUT_DIR/checkpoints")
    add_flags(p)
    return p


def _mixed_precision(args: dict, parser: argparse.ArgumentParser) -> str:
    """``--mixed_precision``, or what ``--fp16`` / ``--bf16`` ask for; conflicting settings are refused."""
    asked = {name for name in ("fp16", "bf16") if args[name]}
    if args["mixed_precision"] != "no":
        asked.add(args["mixed_precision"])
    if len(asked) > 1:
        parser.error(f"conflicting precisions: {', '.join(sorted(asked))}; give one of --fp16, --bf16, --mixed_precision")
    return asked.pop() if asked else "no"


def parse_job(argv: list[str] | None = None) -> TrainJob:
    """The command line (or a ``train.py args.json`` file) as a ``TrainJob``; bad values exit 2 with a message."""
    parser = build_parser()
    namespace, unknown = parser.parse_known_args(json_argv(sys.argv[1:] if argv is None else argv))
    if unknown:
        parser.error(
            f"unrecognized arguments: {' '.join(unknown)}. These are not options of python -m trainer (see --help); "
            "docs/compatibility.md lists every upstream train.py flag and what it does here"
        )
    errors, notes = check_flags(namespace)
    if errors:
        parser.error("; ".join(errors))
    args = vars(namespace)
    if not (args["data"] or args["cache_dir"]):
        parser.error("give --data FILE_OR_FOLDER, or --cache_dir FOLDER holding medi-data.json as upstream train.py takes it")
    args["data"] = args["data"] or args["cache_dir"]
    args["mixed_precision"] = _mixed_precision(args, parser)
    job = TrainJob(**{f.name: args[f.name] for f in dataclasses.fields(TrainJob)})
    problems = job.problems()
    if problems:
        parser.error("; ".join(problems))
    if os.environ.get("RANK", "0") == "0":  # once, not once per process
        for note in notes:
            print(note, file=sys.stderr)
    return job
