"""Upstream ``train.py``'s flags that are not options of this trainer, so that its command lines run here.

``train.py`` parses its ModelArguments, its DataTrainingArguments and Hugging Face's Seq2SeqTrainingArguments. The
flags that shape training are this trainer's own options (``trainer.config``: same names, same meaning). Each flag
below is accepted at its upstream default, so a line that spells a default out still runs. Set to anything
else, it is either accepted with a note, because it would not change the trained model here (logging, workers,
fields upstream defines and never reads), or refused with what to do here instead.
"""

from __future__ import annotations

import argparse
import json
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

NEVER_READ = "upstream train.py defines it and never reads it"
NO_EVAL = "no evaluation runs during training: score the saved model with `python -m bench.quality.mteb`"
SMALLER_DATA = "train on a smaller data file (e.g. the first rows of medi-data.json) or set --max_steps"
NO_DOWNLOAD = "nothing is downloaded: --model_name_or_path is a local folder (or a hub name already in --cache_dir)"


@dataclass(frozen=True)
class Flag:
    name: str
    default: Any
    kind: type  # str, int, float or bool (bool flags take an optional value, as Hugging Face's parser does)
    note: str  # why it changes nothing here, or what to use instead
    refused: bool = False  # True: any value but the default (or one of ``allowed``) stops the run
    allowed: tuple = ()
    nargs: str | None = None  # "+" for Hugging Face's list flags (--report_to wandb tensorboard)


FLAGS = (
    # ModelArguments
    Flag("config_name", None, str, NEVER_READ),
    Flag("tokenizer_name", None, str, NEVER_READ),
    Flag("use_fast_tokenizer", True, bool, NEVER_READ),
    Flag("model_revision", "main", str, NEVER_READ),
    Flag("use_auth_token", False, bool, NO_DOWNLOAD),
    Flag("resize_position_embeddings", None, bool, NEVER_READ),
    # DataTrainingArguments
    *(Flag(n, None, str, NEVER_READ) for n in (
        "lang", "dataset_name", "processed_data_dir", "dataset_config_name", "sample_selection_train_file_path",
        "text_column", "summary_column", "train_file", "test_file", "forced_bos_token",
    )),
    Flag("source_prefix", "", str, NEVER_READ),
    *(Flag(n, None, int, NEVER_READ) for n in ("val_max_target_length", "max_eval_samples", "max_predict_samples", "num_beams")),
    Flag("def_only", False, bool, NEVER_READ),
    Flag("sub_sample_ratio", 2.0, float, NEVER_READ),
    Flag("overwrite_cache", False, bool, "the data index cached in OUTPUT_DIR is rebuilt whenever the data file changes"),
    Flag("preprocessing_num_workers", None, int, "texts are tokenized per step; the data is indexed in one streaming pass"),
    Flag("ignore_pad_token_for_loss", True, bool, "the contrastive loss has no labels to pad"),
    Flag("validation_file", None, str, NO_EVAL, refused=True),
    Flag("debug_mode", None, int, SMALLER_DATA, refused=True),
    Flag("max_examples", None, int, SMALLER_DATA, refused=True),
    Flag("max_train_samples", None, int, SMALLER_DATA, refused=True),
    Flag("add_prompt_to_document", True, bool, "write the data with empty instructions instead", refused=True),
    # Seq2SeqTrainingArguments that change nothing here
    Flag("do_train", False, bool, "training is what python -m trainer does"),
    Flag("local_rank", -1, int, ""),  # passed by launchers; the rank comes from the environment
    *(Flag(n, None, str, "every step is logged to OUTPUT_DIR/train_log.jsonl, plotted to loss_curve.png")
      for n in ("logging_dir", "logging_strategy", "run_name", "log_level")),
    Flag("report_to", None, str, "every step is logged to OUTPUT_DIR/train_log.jsonl, plotted to loss_curve.png", nargs="+"),
    Flag("logging_steps", 500.0, float, "every step is logged to OUTPUT_DIR/train_log.jsonl, plotted to loss_curve.png"),
    Flag("logging_first_step", False, bool, "every step is logged to OUTPUT_DIR/train_log.jsonl"),
    Flag("disable_tqdm", False, bool, "the progress bar shows on the main process only"),
    Flag("dataloader_num_workers", 0, int, "rows are read on demand from a memory map"),
    Flag("dataloader_pin_memory", True, bool, "rows are read on demand from a memory map"),
    Flag("dataloader_drop_last", False, bool, "each task's incomplete chunk is always left out, as upstream does"),
    Flag("remove_unused_columns", True, bool, "there are no dataset columns"),
    Flag("ddp_find_unused_parameters", None, bool, "every trained parameter gets a gradient (BERT's unused pooler is frozen)"),
    Flag("per_device_eval_batch_size", 8, int, NO_EVAL),
    Flag("eval_steps", None, float, NO_EVAL),
    Flag("predict_with_generate", False, bool, NO_EVAL),
    Flag("save_safetensors", True, bool, "checkpoints are always safetensors plus JSON, never pickles"),
    Flag("fp16_opt_level", "O1", str, "fp16 runs through torch autocast"),
    # Seq2SeqTrainingArguments this trainer does another way
    Flag("do_eval", False, bool, NO_EVAL, refused=True),
    Flag("do_predict", False, bool, NO_EVAL, refused=True),
    Flag("evaluation_strategy", "no", str, NO_EVAL, refused=True),
    Flag("eval_strategy", "no", str, NO_EVAL, refused=True),
    Flag("gradient_accumulation_steps", 1, int,
         "accumulation would give each micro-batch its own in-batch negatives; use a larger --per_device_train_batch_size "
         "with --grad_cache_chunk_size N, which keeps every negative of the batch and needs memory for N texts", refused=True),
    Flag("lr_scheduler_type", "linear", str, "the schedule is linear warmup then linear decay to 0, as upstream ran", refused=True),
    Flag("optim", "adamw_torch", str, "the optimizer is torch's AdamW", refused=True, allowed=("adamw_hf", "adamw_torch_fused")),
    Flag("save_strategy", "steps", str, "checkpoints are written every --save_steps steps", refused=True),
    Flag("data_seed", None, int, "the batch order follows --seed", refused=True),
    Flag("label_smoothing_factor", 0.0, float, "the loss is upstream's contrastive loss, without smoothing", refused=True),
    Flag("no_cuda", False, bool, "hide the GPUs instead: CUDA_VISIBLE_DEVICES= python -m trainer ...", refused=True),
    Flag("use_cpu", False, bool, "hide the GPUs instead: CUDA_VISIBLE_DEVICES= python -m trainer ...", refused=True),
    Flag("tf32", None, bool, "TF32 stays at PyTorch's default", refused=True),
    Flag("torch_compile", False, bool, "the model runs eagerly", refused=True),
    Flag("group_by_length", False, bool, "batches are single-task chunks, as upstream's", refused=True),
    Flag("auto_find_batch_size", False, bool, "set --per_device_train_batch_size, with --grad_cache_chunk_size if memory is short", refused=True),
    Flag("deepspeed", None, str, "launch DDP processes with `accelerate launch --multi_gpu --num_processes N -m trainer ...`", refused=True),
    Flag("fsdp", "", str, "launch DDP processes with `accelerate launch --multi_gpu --num_processes N -m trainer ...`", refused=True),
    Flag("push_to_hub", False, bool, "nothing is uploaded: OUTPUT_DIR holds a sentence-transformers folder", refused=True),
    Flag("hub_model_id", None, str, "nothing is uploaded: OUTPUT_DIR holds a sentence-transformers folder", refused=True),
    Flag("hub_token", None, str, "nothing is uploaded: OUTPUT_DIR holds a sentence-transformers folder", refused=True),
)


def hf_bool(text: str) -> bool:
    """Hugging Face's spelling of booleans on the command line: true/false, yes/no, 1/0 (any case)."""
    value = text.lower()
    if value in ("true", "t", "yes", "y", "1"):
        return True
    if value in ("false", "f", "no", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_bool(group: Any, name: str, help: str, default: bool = False) -> None:
    """``--flag`` alone means true; ``--flag False`` and ``--flag=true`` work too, as in ``train.py``."""
    group.add_argument(f"--{name}", type=hf_bool, nargs="?", const=True, default=default, metavar="true|false", help=help)


def add_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of ``FLAGS`` under their upstream names (``--local-rank`` too), parsed but left out of ``--help``'s
    option list: ``upstream_epilog`` names them in a few lines at the end, and each one's note is in its message."""
    for flag in FLAGS:
        dest = f"upstream_{flag.name}"
        if flag.kind is bool:
            parser.add_argument(f"--{flag.name}", dest=dest, type=hf_bool, nargs="?", const=True, default=flag.default, help=argparse.SUPPRESS)
        else:
            names = [f"--{flag.name}"] + (["--local-rank"] if flag.name == "local_rank" else [])
            parser.add_argument(*names, dest=dest, type=flag.kind, nargs=flag.nargs, default=flag.default, help=argparse.SUPPRESS)


def upstream_epilog(width: int = 116) -> str:
    """``--help``'s compact list of the upstream flags: those that change nothing here, then those refused."""
    noted = " ".join(f"--{f.name}" for f in FLAGS if not f.refused)
    refused = " ".join(f"--{f.name}" for f in FLAGS if f.refused)
    wrap = lambda text: textwrap.fill(text, width, initial_indent="  ", subsequent_indent="  ")  # noqa: E731
    return "\n".join([
        "upstream train.py flags, accepted at their defaults (docs/compatibility.md#training-trainpy):",
        "  no effect here (another value is noted):",
        wrap(noted),
        "  refused at another value, with what to do instead:",
        wrap(refused),
    ])


def check_flags(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """(errors, notes) for the upstream flags given a value other than their default."""
    errors, notes = [], []
    for flag in FLAGS:
        value = getattr(args, f"upstream_{flag.name}")
        if value == flag.default or value in flag.allowed:
            continue
        if flag.refused:
            errors.append(f"--{flag.name} {value}: {flag.note}")
        elif flag.note:
            notes.append(f"note: --{flag.name} has no effect here: {flag.note}")
    return errors, notes


def json_argv(argv: list[str]) -> list[str]:
    """``train.py args.json`` (one JSON file of flag values, as Hugging Face's parser takes) as a command line.

    A file that is not a JSON object raises ``ValueError`` naming it (the parser turns it into a usage error).
    """
    if len(argv) != 1 or not argv[0].endswith(".json") or not Path(argv[0]).is_file():
        return argv
    try:
        values = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{argv[0]}: not a JSON object of train.py flags ({exc})") from exc
    if not isinstance(values, dict):
        raise ValueError(f"{argv[0]}: expected a JSON object of train.py flags, got {type(values).__name__}")
    out: list[str] = []
    for key, value in values.items():
        if value is None:
            continue
        out += [f"--{key}", *(map(str, value) if isinstance(value, list) else [str(value)])]
    return out
