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
import difflib
import math
import os
import sys
import textwrap
from dataclasses import dataclass

from runtime.exit_codes import EPILOG as EXIT_CODES
from trainer.upstream_args import add_bool, add_flags, check_flags, json_argv, upstream_epilog

USAGE = """\
python -m trainer --model_name_or_path FOLDER --output_dir DIR --data FILE [options]
       python -m trainer ARGS.json          (upstream train.py's JSON file of flags)"""

DESCRIPTION = """\
Train an INSTRUCTOR embedder on MEDI-format data with the upstream contrastive loss.

Every optimizer step takes one global batch (per_device_train_batch_size x processes) of ONE task, split across
processes; embeddings are gathered so each query sees the negatives of the whole global batch. N processes:
`accelerate launch --multi_gpu --num_processes N -m trainer ...` (GPUs: NCCL; no CUDA: N CPU processes over gloo).
OUTPUT_DIR receives the trained model (hkunlp sentence-transformers layout), checkpoints/checkpoint-N (no pickles),
train_log.jsonl and loss_curve.png. A NaN or infinite loss stops the run (exit 2) naming the step; the checkpoints
already written are kept and no trained model is saved. Details: docs/training.md.
"""

EXAMPLES = """\
examples:
  python -m trainer --model_name_or_path path/to/gtr-t5-large --data medi-data.json --output_dir out \\
      --per_device_train_batch_size 64 --grad_cache_chunk_size 32 --max_steps 20000 --save_steps 500
  python -m trainer ... --resume_from_checkpoint latest      # after a crash or kill: same final weights
  # upstream train.py's README line, as written (CACHE holds medi-data.json, and the model if it is a hub name)
  python -m trainer --model_name_or_path sentence-transformers/gtr-t5-large --output_dir out --cache_dir CACHE \\
      --max_source_length 512 --num_train_epochs 10 --save_steps 500 --cl_temperature 0.1 --warmup_ratio 0.1 \\
      --learning_rate 2e-5 --overwrite_output_dir
"""


HELP_WIDTH = 116  # the description and epilog are written to this width; the options wrap to it too


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, width=HELP_WIDTH, max_help_position=34)


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
    learning_rate: float | None = None  # the peak; None: DEFAULT_LEARNING_RATE for a new run, the checkpoint's on resume
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

    @property
    def peak_learning_rate(self) -> float:
        """The learning rate a new run peaks at: ``learning_rate`` when given, else upstream's 2e-5."""
        return DEFAULT_LEARNING_RATE if self.learning_rate is None else self.learning_rate

    def warmup_steps_of(self, total: int) -> int:
        """Warmup steps of a ``total``-step run: ``warmup_steps`` when > 0, else ``ceil(warmup_ratio x total)`` (HF's rule)."""
        return self.warmup_steps if self.warmup_steps > 0 else math.ceil(self.warmup_ratio * total)

    def problems(self) -> list[str]:
        """What is wrong with these settings, one message per problem (empty when they can run)."""
        checks = [
            (self.per_device_train_batch_size >= 1, "--per_device_train_batch_size must be >= 1"),
            (self.cl_temperature > 0, "--cl_temperature must be > 0"),
            (self.learning_rate is None or self.learning_rate >= 0, "--learning_rate must be >= 0"),
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
DEFAULT_LEARNING_RATE = 2e-5  # upstream's published command


def build_parser() -> argparse.ArgumentParser:
    """``python -m trainer``'s options, the ones that matter first; upstream train.py's other flags parse silently.

    Those (``trainer.upstream_args``) are listed by name at the end of ``--help``: 60 flags that change nothing
    here would otherwise bury the dozen that do. Abbreviations are refused (``--max_step`` is not ``--max_steps``).
    """
    d = TrainJob  # every default comes from the job's fields
    p = argparse.ArgumentParser(
        prog="python -m trainer", usage=USAGE, description=DESCRIPTION, allow_abbrev=False,
        epilog="\n\n".join([upstream_epilog(HELP_WIDTH), EXAMPLES.rstrip(), textwrap.fill(EXIT_CODES, HELP_WIDTH)]),
        formatter_class=_HelpFormatter,
    )
    io = p.add_argument_group("model, data, output")
    io.add_argument(
        "--model_name_or_path", required=True, metavar="FOLDER",
        help="sentence-transformers folder to start from (gtr-t5-large, an hkunlp INSTRUCTOR, all-MiniLM-L6-v2 ...), or a "
        "hub name already downloaded into --cache_dir or the default caches: nothing is downloaded",
    )
    io.add_argument(
        "--data", metavar="FILE",
        help="MEDI data: a JSON list or JSON lines of {query, pos, neg: [instruction, text], task_name or task_id}, or a "
        "folder holding medi-data.json. Default: --cache_dir",
    )
    io.add_argument("--output_dir", required=True, metavar="DIR", help="where the model, checkpoints/, train_log.jsonl "
                    "and loss_curve.png go; a folder holding a model needs --overwrite_output_dir")
    add_bool(io, "overwrite_output_dir", "start afresh even if --output_dir holds a model or checkpoints")
    io.add_argument("--resume_from_checkpoint", metavar="PATH|latest", help="continue from a checkpoint folder, or the "
                    "newest in OUTPUT_DIR/checkpoints; a --learning_rate given with it replaces the checkpoint's from there on")
    io.add_argument("--cache_dir", metavar="DIR", help="upstream's folder holding medi-data.json and downloaded models")

    sched = p.add_argument_group("steps and schedule")
    sched.add_argument("--max_steps", type=int, default=d.max_steps, metavar="N", help=f"optimizer steps; overrides --num_train_epochs when > 0. Default: {d.max_steps}")
    sched.add_argument("--num_train_epochs", type=float, default=d.num_train_epochs, metavar="E", help=f"epochs over the full single-task batches. Default: {d.num_train_epochs:g}")
    sched.add_argument("--per_device_train_batch_size", type=int, default=d.per_device_train_batch_size, metavar="B", help=f"(query, pos, neg) examples per process per step. Default: {d.per_device_train_batch_size}")
    sched.add_argument("--learning_rate", type=float, default=d.learning_rate, metavar="LR", help=f"peak AdamW learning rate. Default: {DEFAULT_LEARNING_RATE:g} (upstream's); on resume, the checkpoint's")
    sched.add_argument("--warmup_ratio", type=float, default=d.warmup_ratio, metavar="R", help=f"share of the steps with linear warmup, then linear decay to 0. Default: {d.warmup_ratio:g}")
    sched.add_argument("--warmup_steps", type=int, default=d.warmup_steps, metavar="N", help="warmup steps; overrides --warmup_ratio when > 0")
    sched.add_argument("--seed", type=int, default=d.seed, help=f"batch order, dropout, initial RNG state. Default: {d.seed}")

    loss = p.add_argument_group("loss, memory, precision")
    loss.add_argument("--cl_temperature", type=float, default=d.cl_temperature, metavar="TAU", help=f"temperature of cos/tau. Default: {d.cl_temperature:g} (upstream's published command)")
    loss.add_argument("--max_source_length", type=int, default=d.max_source_length, metavar="N", help=f"tokens per text after truncation. Default: {d.max_source_length}")
    loss.add_argument(
        "--grad_cache_chunk_size", type=int, default=d.grad_cache_chunk_size, metavar="N",
        help="GradCache: embed N texts at a time (3 per example) with exact gradients of the whole batch, for batches "
        "larger than memory. Default: 0 (off)",
    )
    loss.add_argument("--mixed_precision", choices=MIXED_PRECISION, default=d.mixed_precision, help=f"autocast precision of the encoder (the loss is fp32). Default: {d.mixed_precision}")
    add_bool(loss, "gradient_checkpointing", "recompute encoder activations in backward to save memory")
    add_bool(loss, "pad_to_max_length", "pad every text to --max_source_length as upstream (default: to each chunk's longest)")

    ck = p.add_argument_group("checkpoints")
    ck.add_argument("--save_steps", type=int, default=d.save_steps, metavar="N", help=f"save the training state every N steps. Default: {d.save_steps}")
    ck.add_argument("--save_total_limit", type=int, default=d.save_total_limit, metavar="N", help="keep only the newest N checkpoints. Default: all")

    opt = p.add_argument_group("optimizer details (Hugging Face's defaults)")
    opt.add_argument("--weight_decay", type=float, default=d.weight_decay, help=f"AdamW weight decay. Default: {d.weight_decay:g}")
    opt.add_argument("--adam_beta1", type=float, default=d.adam_beta1, help=f"Default: {d.adam_beta1:g}")
    opt.add_argument("--adam_beta2", type=float, default=d.adam_beta2, help=f"Default: {d.adam_beta2:g}")
    opt.add_argument("--adam_epsilon", type=float, default=d.adam_epsilon, help=f"Default: {d.adam_epsilon:g}")
    opt.add_argument("--max_grad_norm", type=float, default=d.max_grad_norm, help=f"gradient clipping norm, 0 = off. Default: {d.max_grad_norm:g}")
    add_bool(opt, "fp16", "= --mixed_precision fp16")
    add_bool(opt, "bf16", "= --mixed_precision bf16")
    p.add_argument("--debug", action="store_true", help="print the traceback of an error on stderr")
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


def _unrecognized(unknown: list[str], parser: argparse.ArgumentParser) -> str:
    """The refusal of flags this trainer does not know, with the option a misspelt or shortened one was meant to be."""
    known = list(parser._option_string_actions)  # every --flag, upstream ones included
    guesses = []
    for flag in (u.split("=", 1)[0] for u in unknown if u.startswith("--")):
        # an abbreviation (what argparse used to accept silently) or a near miss
        close = [k for k in known if k.startswith(flag)] or difflib.get_close_matches(flag, known, n=1, cutoff=0.85)
        guesses += [f"{flag} -> {' or '.join(close[:3])}?"] if close else []
    hint = f" (did you mean: {', '.join(guesses)})" if guesses else ""
    return (
        f"unrecognized arguments: {' '.join(unknown)}{hint}. These are not options of python -m trainer (spelt out in "
        "full, no abbreviations; see --help); docs/compatibility.md lists every upstream train.py flag and what it does here"
    )


def parse_command(argv: list[str] | None = None) -> tuple[TrainJob, bool]:
    """The command line (or a ``train.py args.json`` file) as a ``TrainJob`` and ``--debug``; bad values exit 2."""
    parser = build_parser()
    try:
        argv = json_argv(sys.argv[1:] if argv is None else argv)
    except ValueError as exc:
        parser.error(str(exc))
    namespace, unknown = parser.parse_known_args(argv)
    if unknown:
        parser.error(_unrecognized(unknown, parser))
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
    return job, args["debug"]


def parse_job(argv: list[str] | None = None) -> TrainJob:
    """The command line as a ``TrainJob`` (``parse_command`` without ``--debug``)."""
    return parse_command(argv)[0]
