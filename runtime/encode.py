"""``python -m runtime.encode --engine E --input docs.jsonl --output emb.npy``: see ``--help``."""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from runtime.bundle import EngineError, atomic_write_text
from runtime.encoder import DEFAULT_MAX_TOKENS, Encoder
from runtime.readers import InputError, Record, ReaderOptions, Skipped, input_format, read_records
from runtime.resume import ResumeError, ShardStore, parts_dir
from runtime.writers import DTYPES, check_output, publish, write_output

EXIT_INPUT = 1  # bad input data (the message names file, line and field)
EXIT_SETUP = 2  # engine missing/corrupt/mismatched, bad options, output in the way

DESCRIPTION = """\
Embed a file of documents with an exported engine (.onnx via ONNX Runtime, .plan via TensorRT); no torch.

Input (one document per row): .txt (a document per line), .jsonl (one JSON object per line), .csv/.tsv (with a
header row), .parquet. Each row's text is --text-field; its instruction is --instruction for every row, or
--instruction-field per row (INSTRUCTOR's [instruction, text] input); without either, rows are plain strings.

Output: .npy (float32 [rows, dim], or --dtype float16), or .parquet (columns line, id with --id-field, embedding).
Rows keep the input order. OUTPUT.summary.json records rows, tokens, truncated and skipped rows, docs/s, tokens/s,
padding waste and the engine manifest's sha256; the same summary is printed.

Crash-safe: finished shards of --shard-rows rows are kept in OUTPUT.parts/ with a state file. After an
interruption (even kill -9) run the same command again: it resumes, and the output is byte-identical to an
uninterrupted run. The output appears in one rename when complete. --overwrite starts again from scratch.

Exit codes: 0 done; 1 bad input (file:line: field: why); 2 engine or setup problem.
"""

TEST_HOOK_ENV = "RUNTIME_ENCODE_TEST_HOOK"  # test-only: "kill|pause" "@" point, e.g. "kill@commit:3"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m runtime.encode", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--engine", required=True, help="engine bundle: NAME.onnx or NAME.plan (from `python -m export`)")
    p.add_argument("--input", required=True, type=Path, help="documents: .txt, .jsonl, .csv, .tsv or .parquet")
    p.add_argument("--output", required=True, type=Path, help="embeddings: .npy or .parquet")
    p.add_argument("--text-field", default="text", help="field/column holding the text (default: text)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--instruction", help='one instruction for every row, e.g. "Represent the document for retrieval: "')
    group.add_argument("--instruction-field", help="field/column holding each row's instruction")
    p.add_argument("--id-field", help="field/column with each row's id, kept in a .parquet output's id column")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="output precision (default: float32)")
    p.add_argument("--on-error", choices=("raise", "skip"), default="raise",
                   help="a bad row stops the run (raise, default) or is left out and listed in the summary (skip)")
    p.add_argument("--batch-size", type=int, default=64, help="most rows per engine batch (default: 64)")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                   help=f"most padded tokens per batch, rows x longest row (default: {DEFAULT_MAX_TOKENS})")
    p.add_argument("--max-padding", type=float, default=0.05,
                   help="close a batch before padding passes this share of it (default: 0.05)")
    p.add_argument("--shard-rows", type=int, default=4096,
                   help="rows per shard: the unit of resumption and of length sorting (default: 4096)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: CUDA when available (always for .plan), else CPU")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (default 0: one per core)")
    p.add_argument("--verify-engine", action="store_true", help="also check the engine file's sha256 against the manifest")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output and discard unfinished work")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no printed summary (still written to file)")
    ray = p.add_argument_group("Ray (many GPUs or machines; needs pip install 'instructor-stack[dist]')")
    ray.add_argument("--ray", action="store_true",
                     help="run on Ray Data: read, tokenize and encode in parallel; --output is then a folder of parquet "
                          "shards (line, [id], embedding, tokens, truncated), not resumable by shard")
    ray.add_argument("--ray-address", help="an existing cluster (e.g. ray://head:10001 or auto); default: start one here")
    ray.add_argument("--num-workers", type=int, default=1, help="engine actors, one engine each (default: 1)")
    ray.add_argument("--gpus-per-worker", type=float, help="GPUs per actor (default: 1 for .plan, 0 for .onnx)")
    ray.add_argument("--build-on-worker", action="store_true",
                     help="an actor whose GPU or TensorRT differs from the .plan's rebuilds it from the bundle's ONNX "
                          "(cached per compute capability and TensorRT version) instead of refusing it")
    args = p.parse_args(argv)
    if args.num_workers < 1:
        p.error("--num-workers must be >= 1")
    if args.build_on_worker and not args.ray:
        p.error("--build-on-worker goes with --ray")
    for name in ("batch_size", "max_tokens", "shard_rows"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if not 0.0 <= args.max_padding < 1.0:
        p.error("--max-padding must be in [0, 1)")
    return args


class _TestHook:
    """Lets the tests stop this process at an exact point (``kill@commit:3``, ``pause@commit:2``, ``kill@publish``).

    ``kill`` sends SIGKILL to this process; ``pause`` prints ``PAUSED <point>`` on stderr and waits to be killed.
    Unset (always, outside the tests) it does nothing.
    """

    def __init__(self, spec: str | None) -> None:
        self.action, _, self.point = (spec or "").partition("@")

    def __call__(self, point: str) -> None:
        if not self.action or point != self.point:
            return
        if self.action == "pause":
            print(f"PAUSED {point}", file=sys.stderr, flush=True)
            threading.Event().wait()
        os.kill(os.getpid(), signal.SIGKILL)


def job_fingerprint(args: argparse.Namespace, encoder: Encoder) -> dict[str, Any]:
    """What must be the same for shards of an earlier run to be reused (anything that changes their bytes)."""
    stat = args.input.stat()
    return {
        "input": str(args.input.resolve()),
        "input_bytes": stat.st_size,
        "input_mtime_ns": stat.st_mtime_ns,
        "engine_manifest_sha256": encoder.manifest.sha256,
        "backend": encoder.backend.name,
        "threads": args.threads,
        "text_field": args.text_field,
        "instruction": args.instruction,
        "instruction_field": args.instruction_field,
        "id_field": args.id_field,
        "on_error": args.on_error,
        "shard_rows": args.shard_rows,
        "batch_size": args.batch_size,
        "max_tokens": args.max_tokens,
        "max_padding": args.max_padding,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Encode ``args.input`` into ``args.output`` (resuming when possible); return the summary."""
    hook = _TestHook(os.environ.get(TEST_HOOK_ENV))
    check_output(args.output, args.dtype, args.id_field is not None)
    input_format(args.input)
    if not args.input.is_file():
        raise InputError(args.input, None, None, "input file not found")
    if args.output.exists() and not args.overwrite and not parts_dir(args.output).is_dir():
        raise FileExistsError(f"{args.output} exists; pass --overwrite to replace it")
    started = time.perf_counter()
    device = None if args.device == "auto" else args.device
    encoder = Encoder(
        args.engine, device=device, max_tokens=args.max_tokens, window=args.shard_rows,
        max_padding=args.max_padding, verify_engine_hash=args.verify_engine, **_onnx_options(args),
    )
    store = ShardStore(args.output, job_fingerprint(args, encoder)).open(overwrite=args.overwrite)
    resumed = store.done_rows
    skipped = Skipped()
    opts = ReaderOptions(args.text_field, args.instruction, args.instruction_field, args.id_field, args.on_error)
    records = itertools.islice(read_records(args.input, opts, skipped), resumed, None)
    bar = tqdm(desc="Encoding", unit="doc", initial=resumed, disable=args.quiet, dynamic_ncols=True, file=sys.stderr)
    session = {"rows": 0, "tokens": 0}  # encoded by this run (a resumed run counts only its own rows)
    loop_start = time.perf_counter()

    def progress(rows: int, tokens: int) -> None:
        session["rows"] += rows
        session["tokens"] += tokens
        bar.update(rows)
        rate = session["tokens"] / max(time.perf_counter() - loop_start, 1e-9)
        bar.set_postfix_str(f"{rate:,.0f} tok/s", refresh=False)

    try:
        with bar:
            for window in encoder.stream(records, args.batch_size, args.max_tokens, Record.as_input, progress):
                items: list[Record] = window.items
                ids = [r.id or "" for r in items] if args.id_field else None
                store.save_shard(window.vectors, np.array([r.line for r in items], dtype=np.int64), ids)
                hook(f"save:{len(store.shards)}")
                store.commit(window.stats)
                hook(f"commit:{len(store.shards)}")
    except InputError:
        if not store.shards:  # nothing worth resuming: leave no parts folder in the way of the fixed input
            store.remove()
        raise
    loop_s = time.perf_counter() - loop_start
    stats = store.stats
    tmp = store.temp_output()
    write_output(store.iter_shards(), tmp, stats.rows, encoder.embedding_dim, args.dtype, args.id_field is not None)
    hook("publish")
    publish(tmp, args.output)
    elapsed = time.perf_counter() - started
    summary = {
        "output": str(args.output),
        "input": str(args.input),
        "rows": stats.rows,
        "tokens": stats.tokens,
        "padded_tokens": stats.padded_tokens,
        "padding_waste": round(stats.padding_waste, 6),
        "truncated_rows": stats.truncated,
        "skipped_rows": skipped.count,
        "skipped_lines": skipped.lines,
        "skipped_errors": skipped.first_errors,
        "resumed_rows": resumed,
        "elapsed_s": round(elapsed, 3),
        "encode_s": round(loop_s, 3),
        "docs_per_s": round(session["rows"] / max(loop_s, 1e-9), 2),
        "tokens_per_s": round(session["tokens"] / max(loop_s, 1e-9), 1),
        "embedding_dim": encoder.embedding_dim,
        "dtype": args.dtype,
        "engine": str(args.engine),
        "engine_manifest_sha256": encoder.manifest.sha256,
        "precision": encoder.manifest.precision,
        "backend": encoder.backend.name,
    }
    atomic_write_text(summary_path(args.output), json.dumps(summary, indent=2) + "\n")
    hook("summary")
    store.remove()
    encoder.close()
    return summary


def summary_path(output: Path) -> Path:
    return Path(f"{output}.summary.json")


def _onnx_options(args: argparse.Namespace) -> dict[str, Any]:
    return {"intra_op_threads": args.threads} if args.engine.lower().endswith(".onnx") else {}


def run_on_ray(args: argparse.Namespace) -> dict[str, Any]:
    from runtime.ray_encode import encode_with_ray

    opts = ReaderOptions(args.text_field, args.instruction, args.instruction_field, args.id_field, args.on_error)
    return encode_with_ray(
        args.engine, args.input, args.output, opts, num_workers=args.num_workers,
        gpus_per_worker=args.gpus_per_worker, ray_address=args.ray_address, batch_size=args.batch_size,
        max_tokens=args.max_tokens, dtype=args.dtype, threads=args.threads or 1, overwrite=args.overwrite,
        quiet=args.quiet, build_on_worker=args.build_on_worker,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        summary = run_on_ray(args) if args.ray else run(args)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INPUT
    except (EngineError, ResumeError, FileExistsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_SETUP
    except KeyboardInterrupt:
        print("interrupted: run the same command again to resume", file=sys.stderr)
        return 130
    if not args.quiet:
        print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
