"""``python -m runtime.encode --engine E --input docs.jsonl --output emb.npy``: see ``--help``."""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
from tqdm.auto import tqdm

from runtime import exit_codes
from runtime.files.atomic import publish
from runtime.bundle import EngineError
from runtime.chunking import LONG_TEXT, POOLING, WindowTooSmall, max_overlap
from runtime.deps import MissingDependency
from runtime.batching import GPU_MAX_TOKENS
from runtime.encoder import DEFAULT_MAX_TOKENS, Encoder, Window
from runtime.job import CHUNK_OUTPUT, DEVICES, ON_ERROR, EncodeJob, RayOptions, RunSummary
from runtime.files.locks import ExclusiveLock, LockHeld
from runtime.output_dtype import NEEDS_RANGES, OUTPUT_DTYPES, calibration_ranges, load_ranges, ranges_path, save_ranges
from runtime.files.readers import InputError, Record, Skipped, input_format, read_records
from runtime.files.resume import ResumeError, ShardStore, parts_dir, records_digest
from runtime.tokenization import InstructionTokenizer
from runtime.files.writers import check_output, write_output

EXIT_INPUT = exit_codes.INPUT  # bad input data (the message names file, line and field)
EXIT_SETUP = exit_codes.USAGE  # engine missing/corrupt/mismatched, bad options, output in the way
EXIT_ENVIRONMENT = exit_codes.ENVIRONMENT  # another run holding the output, a missing package, disk full, permissions

# What each failure means for the exit code (most specific first; other OSErrors by errno, anything else internal).
KNOWN_ERRORS: dict[type[BaseException], int] = {
    InputError: EXIT_INPUT,
    LockHeld: EXIT_ENVIRONMENT,
    MissingDependency: EXIT_ENVIRONMENT,
    EngineError: EXIT_SETUP,
    ResumeError: EXIT_SETUP,
    FileExistsError: EXIT_SETUP,
    ValueError: EXIT_SETUP,
}
RESUME_HINT = "finished shards are kept: fix this and run the same command again to resume"

DESCRIPTION = """\
Embed a file of documents with an exported engine (.onnx via ONNX Runtime, .plan via TensorRT; no torch), or a
.pt2 (torch.export + AOTInductor, run by the torch version and on the device it was built for).

Input (one document per row): .txt (a document per line), .jsonl (one JSON object per line; blank lines are
skipped), .csv/.tsv (with a header row), .parquet; a UTF-8 byte-order mark is fine. Each row's text is
--text-field; its instruction is --instruction for every row, or --instruction-field per row (INSTRUCTOR's
[instruction, text] input); without either, rows are plain strings.

Output: .npy ([rows, dim]), or .parquet (columns line, id with --id-field, embedding). Rows keep the input order.
--output-dtype: float32 (default), float16, int8, uint8 (per-dimension ranges from --int8-ranges, else from the
first --shard-rows vectors; saved as OUTPUT.ranges.npy to quantize queries the same way), binary or ubinary (sign
bits, 8 per byte): sentence-transformers' quantize_embeddings semantics. OUTPUT.summary.json records rows, tokens,
truncated, skipped and blank rows, docs/s, tokens/s, padding waste and the engine manifest's sha256; the same
summary is printed.

Long texts: --long-text truncate (default, as InstructorEmbedding) cuts a text at the engine's max_seq_length.
--long-text chunk splits it into overlapping windows (--chunk-overlap tokens) that each repeat the instruction,
batched with everything else; a row's vector is the token-weighted mean of its chunks' (--chunk-pooling max: their
element-wise max), normalized again. --chunk-output all writes one .parquet row per chunk instead, with columns
chunk (its number in the row) and span (its [start, end) token positions in the row).

Crash-safe: finished shards of --shard-rows rows are kept in OUTPUT.parts/ with a state file and a digest of the
input rows each shard came from. After an interruption (even kill -9, a full disk) run the same command again:
it resumes, and the output is byte-identical to an uninterrupted run; an input edited since is refused. The output
appears in one rename when complete. --overwrite starts again from scratch. One run at a time may write an output
(OUTPUT.lock); a second one exits 3 naming the first.

The engine file is checked against its manifest's sha256 on its first use (then remembered by path, size, times
and inode in the cache folder); --no-verify-engine skips that.

Rows with an 'instruction' field but no --instruction-field are embedded as plain text: a warning on stderr and in
the summary's "warnings" says so.
"""

# Called at named points of a run ("save:3", "commit:3", "publish", "summary"): tests stop the process there.
PointHook = Callable[[str], None]


def build_parser() -> argparse.ArgumentParser:
    d = EncodeJob  # every default comes from the job's fields
    p = argparse.ArgumentParser(
        prog="python -m runtime.encode", description=DESCRIPTION, epilog=exit_codes.EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False,
    )
    p.add_argument("--engine", required=True, help="engine bundle: NAME.onnx, NAME.plan or NAME.pt2 (from `python -m export`)")
    p.add_argument("--input", required=True, type=Path, help="documents: .txt, .jsonl, .csv, .tsv or .parquet")
    p.add_argument("--output", required=True, type=Path, help="embeddings: .npy or .parquet")
    p.add_argument("--text-field", default=d.text_field, help=f"field/column holding the text (default: {d.text_field})")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--instruction", help='one instruction for every row, e.g. "Represent the document for retrieval: "')
    group.add_argument("--instruction-field", help="field/column holding each row's instruction")
    p.add_argument("--id-field", help="field/column with each row's id, kept in a .parquet output's id column")
    p.add_argument("--output-dtype", "--dtype", dest="output_dtype", choices=OUTPUT_DTYPES, default=d.output_dtype,
                   help=f"output vector type (default: {d.output_dtype}); see above")
    p.add_argument("--int8-ranges", type=Path,
                   help="int8/uint8: [2, dim] per-dimension minima and maxima (e.g. an earlier run's OUTPUT.ranges.npy)")
    p.add_argument("--long-text", choices=LONG_TEXT, default=d.long_text, help=f"texts over max_seq_length (default: {d.long_text})")
    p.add_argument("--chunk-overlap", type=int, default=d.chunk_overlap,
                   help=f"tokens shared by neighbouring chunks (default: {d.chunk_overlap})")
    p.add_argument("--chunk-pooling", choices=POOLING, default=d.chunk_pooling,
                   help=f"a chunked row's vector from its chunks' (default: {d.chunk_pooling})")
    p.add_argument("--chunk-output", choices=CHUNK_OUTPUT, default=d.chunk_output,
                   help=f"row: one vector per row; all: one per chunk, .parquet only (default: {d.chunk_output})")
    p.add_argument("--on-error", choices=ON_ERROR, default=d.on_error,
                   help="a bad row stops the run (raise, default) or is left out and listed in the summary (skip)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"most rows per engine batch (default: {d.batch_size})")
    p.add_argument("--max-tokens", type=int, default=d.max_tokens,
                   help=f"most padded tokens per batch, rows x longest row (default: {DEFAULT_MAX_TOKENS} on the CPU, "
                        f"{GPU_MAX_TOKENS} on a GPU)")
    p.add_argument("--max-padding", type=float, default=d.max_padding,
                   help=f"close a batch before padding passes this share of it (default: {d.max_padding})")
    p.add_argument("--shard-rows", type=int, default=d.shard_rows,
                   help=f"rows per shard: the unit of resumption and of length sorting (default: {d.shard_rows})")
    p.add_argument("--device", choices=DEVICES, default=d.device,
                   help="auto: CUDA when available (always for .plan; for .pt2 the device it was built for), else CPU")
    p.add_argument("--threads", type=int, default=d.threads, help="ONNX Runtime intra-op threads (default 0: one per core)")
    p.add_argument("--precision", default=d.precision,
                   help="which engine of a --precision auto bundle runs: auto (the fastest that passed its gate on this "
                        "CPU, measured once per machine), fp32, bf16, int8, or an engine's name (e.g. openvino-bf16); "
                        "the summary's engine_choice says which ran and why (default: auto)")
    p.add_argument("--verify-engine", action=argparse.BooleanOptionalAction, default=d.verify_engine,
                   help="check the engine file's sha256 against the manifest on its first use (default: on)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output and discard unfinished work")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no printed summary (still written to file)")
    p.add_argument("--debug", action="store_true", help="on an internal error, print the traceback (else it goes to a log file)")
    r = RayOptions
    ray = p.add_argument_group("Ray (many GPUs or machines; needs pip install 'instructor-stack[dist]')")
    ray.add_argument("--ray", action="store_true",
                     help="run on Ray Data: read, tokenize and encode in parallel; --output is then a folder of parquet "
                          "shards (line, [id], embedding, tokens, truncated), not resumable by shard")
    ray.add_argument("--ray-address", help="an existing cluster (e.g. ray://head:10001 or auto); default: start one here")
    ray.add_argument("--num-workers", type=int, default=r.num_workers, help=f"engine actors, one engine each (default: {r.num_workers})")
    ray.add_argument("--gpus-per-worker", type=float, help="GPUs per actor (default: 1 for .plan and a CUDA .pt2, 0 for .onnx)")
    ray.add_argument("--build-on-worker", action="store_true",
                     help="an actor whose GPU or TensorRT differs from the .plan's rebuilds it from the bundle's ONNX "
                          "(cached per compute capability and TensorRT version) instead of refusing it")
    return p


def parse_job(argv: list[str] | None = None) -> EncodeJob:
    """The command line as an ``EncodeJob``; bad options exit 2 with argparse's usage message."""
    return _parse(argv)[0]


def _parse(argv: list[str] | None) -> tuple[EncodeJob, argparse.Namespace]:
    p = build_parser()
    a = p.parse_args(argv)
    if a.build_on_worker and not a.ray:
        p.error("--build-on-worker goes with --ray")
    ray = None
    if a.ray:
        ray = RayOptions(address=a.ray_address, num_workers=a.num_workers, gpus_per_worker=a.gpus_per_worker,
                         build_on_worker=a.build_on_worker)
    job = EncodeJob(
        engine=a.engine, input=a.input, output=a.output, text_field=a.text_field, instruction=a.instruction,
        instruction_field=a.instruction_field, id_field=a.id_field, output_dtype=a.output_dtype,
        int8_ranges=a.int8_ranges, long_text=a.long_text, chunk_overlap=a.chunk_overlap, chunk_pooling=a.chunk_pooling,
        chunk_output=a.chunk_output, on_error=a.on_error,
        batch_size=a.batch_size, max_tokens=a.max_tokens, max_padding=a.max_padding, shard_rows=a.shard_rows,
        device=a.device, threads=a.threads, precision=a.precision, verify_engine=a.verify_engine, overwrite=a.overwrite, quiet=a.quiet, ray=ray,
    )
    problems = job.problems()
    if problems:
        p.error("; ".join(problems))
    return job, a


def resume_fingerprint(job: EncodeJob, encoder: Encoder) -> dict[str, object]:
    """What must be the same for shards of an earlier run to be reused (anything that changes their bytes).

    The input's content is checked window by window while resuming (``ShardStore.check_window``), not here.
    """
    return {
        "input": str(job.input.resolve()),
        "engine_manifest_sha256": encoder.manifest.sha256,
        "backend": encoder.backend.name,
        "cpu_engine": encoder.engine_choice.name,
        "threads": job.threads,
        "text_field": job.text_field,
        "instruction": job.instruction,
        "instruction_field": job.instruction_field,
        "id_field": job.id_field,
        "on_error": job.on_error,
        "shard_rows": job.shard_rows,
        "batch_size": job.batch_size,
        "max_tokens": encoder.max_tokens,
        "max_padding": job.max_padding,
        "long_text": job.long_text,
        "chunk_overlap": job.chunk_overlap,
        "chunk_pooling": job.chunk_pooling,
        "chunk_output": job.chunk_output,
    }


def lock_path(output: Path) -> Path:
    return Path(f"{output}.lock")


def check_paths(job: EncodeJob) -> None:
    """Refuse, before any work, an input that is not there or an output that would destroy something."""
    input_format(job.input)
    if not job.input.is_file():
        raise InputError(job.input, None, None, "input file not found")
    out = job.output
    if out.resolve() == job.input.resolve() or (out.exists() and out.samefile(job.input)):
        raise ValueError(f"{out}: the output is the input file; choose another output path (--overwrite never replaces the input)")
    if out.is_dir() and job.ray is None:
        raise ValueError(f"{out}: is a folder; the output must be a .npy or .parquet file path")
    folder = out.absolute().parent
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise ValueError(f"{out}: the output's folder {folder} {what}; create it first or choose another --output")


def check_chunk_overlap(job: EncodeJob, tokenizer: InstructionTokenizer) -> None:
    """With --long-text chunk, refuse before any row is encoded an overlap that leaves no room for windows.

    The bound is the engine's: max_seq_length less its special tokens (and --instruction's tokens, which every
    chunk repeats). A per-row instruction too long for the overlap is named by its line when it is met.
    """
    if job.long_text != "chunk":
        return
    head, tail = tokenizer.special_tokens
    prefix, given = len(head), ""
    if job.instruction is not None:
        n = int(tokenizer.encode([[job.instruction, ""]], truncate=False).instruction_count[0])
        prefix, given = max(prefix, n), f"; --instruction takes {n}"
    limit = max_overlap(tokenizer.max_seq_length, prefix, len(tail))
    if job.chunk_overlap > limit:
        specials = len(head) + len(tail)
        engine = f"max_seq_length {tokenizer.max_seq_length}, of which {specials} special token{'' if specials == 1 else 's'}{given}"
        if limit < 0:
            raise ValueError(f"--long-text chunk: this engine's windows have no room left ({engine}); shorten --instruction")
        raise ValueError(f"--chunk-overlap {job.chunk_overlap}: must be in [0, {limit}] for this engine ({engine})")


def run(job: EncodeJob, on_point: PointHook | None = None) -> RunSummary:
    """Encode ``job.input`` into ``job.output`` (resuming when possible) under the output's lock; the summary."""
    check_paths(job)
    with ExclusiveLock(lock_path(job.output), str(job.output)):
        if job.ray is not None:
            from runtime.ray_encode import encode_with_ray

            return encode_with_ray(job)
        return _run_locked(job, on_point or (lambda point: None))


def _run_locked(job: EncodeJob, hook: PointHook) -> RunSummary:
    check_output(job.output, job.id_field is not None, job.keep_chunks)
    if job.output.exists() and not job.overwrite and not parts_dir(job.output).is_dir():
        raise FileExistsError(f"{job.output} exists; pass --overwrite to replace it")
    started = time.perf_counter()
    encoder = Encoder(job.engine, device=job.engine_device, window=job.shard_rows, **job.encoder_options())
    check_chunk_overlap(job, encoder.tokenizer)
    given_ranges = load_ranges(job.int8_ranges, encoder.embedding_dim) if job.int8_ranges else None
    store = ShardStore(job.output, resume_fingerprint(job, encoder)).open(overwrite=job.overwrite)
    resumed = store.done_rows
    skipped = Skipped()
    records = _warn_once(_after_done_windows(read_records(job.input, job.reader_options(), skipped), store), skipped, job)
    bar = tqdm(desc="Encoding", unit="doc", initial=resumed, disable=job.quiet, dynamic_ncols=True, file=sys.stderr)
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
            for window in encoder.stream(records, job.batch_size, job.max_tokens, Record.as_input, progress, job.keep_chunks):
                arrays = shard_arrays(window, job)
                store.save_shard(arrays)
                hook(f"save:{len(store.shards)}")
                store.commit(window.stats, records_digest(window.items), len(arrays["vectors"]))
                hook(f"commit:{len(store.shards)}")
    except (InputError, WindowTooSmall) as exc:
        if not store.shards:  # nothing worth resuming: leave no parts folder in the way of the fixed input
            store.remove()
        if isinstance(exc, WindowTooSmall):
            raise too_long_instruction(job, exc) from exc
        raise
    loop_s = time.perf_counter() - loop_start
    stats = store.stats
    ranges = output_ranges(job, store, given_ranges)
    tmp = store.temp_output()
    columns = (("id",) if job.id_field else ()) + (("chunk",) if job.keep_chunks else ())
    write_output(store.iter_shards(), tmp, store.vectors, encoder.embedding_dim, job.output_dtype, ranges, columns)
    hook("publish")
    publish(tmp, job.output)
    summary = RunSummary.of(
        job, encoder.manifest, skipped, stats.rows, stats.tokens, stats.truncated, time.perf_counter() - started,
        rate=(session["rows"], session["tokens"], loop_s),
        padded_tokens=stats.padded_tokens,
        padding_waste=round(stats.padding_waste, 6),
        resumed_rows=resumed,
        encode_s=round(loop_s, 3),
        backend=encoder.backend.name,
        precision=encoder.engine_choice.precision,
        engine_choice=encoder.engine_choice.as_dict(),
        **chunk_counts(job, stats.chunks, stats.split_rows, store.vectors),
        ranges=str(ranges_path(job.output)) if ranges is not None else None,
    )
    summary.write()
    hook("summary")
    store.remove()
    encoder.close()
    return summary


def shard_arrays(window: Window, job: EncodeJob) -> dict[str, np.ndarray]:
    """What a shard keeps: float32 vectors and, per vector, its source line (and id; chunk and span)."""
    items: list[Record] = window.items
    lines = np.array([r.line for r in items], dtype=np.int64)
    ids = np.asarray([r.id or "" for r in items], dtype=str) if job.id_field else None
    if not job.keep_chunks:
        arrays = {"vectors": window.vectors, "lines": lines}
        pick = slice(None)
    else:
        c = window.chunks
        arrays = {"vectors": c.vectors, "lines": lines[c.row], "chunk": c.index, "span": c.span}
        pick = c.row
    if ids is not None:
        arrays["ids"] = ids[pick]
    return arrays


def output_ranges(job: EncodeJob, store: ShardStore, given: np.ndarray | None):
    """int8/uint8: the given ranges, or those of the first shard's vectors; saved beside the output (atomically)."""
    if job.output_dtype not in NEEDS_RANGES:
        return None
    ranges = given
    if ranges is None:
        first = next(store.iter_shards(), None)
        if first is None or len(first["vectors"]) < 2:
            raise ValueError(f"--output-dtype {job.output_dtype}: fewer than 2 vectors to take ranges from; pass --int8-ranges")
        ranges = calibration_ranges(first["vectors"])
    save_ranges(ranges_path(job.output), ranges)
    return ranges


def chunk_counts(job: EncodeJob, chunks: int, split_rows: int, vectors: int) -> dict[str, object]:
    """The summary's chunking fields (only with --long-text chunk)."""
    if job.long_text != "chunk":
        return {}
    return {"long_text": job.long_text, "chunks": chunks, "split_rows": split_rows, "output_vectors": vectors}


def _after_done_windows(records: Iterable[Record], store: ShardStore) -> Iterator[Record]:
    """The records after the committed shards, once each done window is checked against its shard's digest."""
    source = iter(records)
    for index, shard in enumerate(store.shards):
        window = list(itertools.islice(source, shard["rows"]))
        if len(window) < shard["rows"]:
            raise ResumeError(
                f"{store.job.get('input')}: the input is shorter than when {store.shard_path(index).name} was made; "
                "pass --overwrite to start again"
            )
        store.check_window(index, records_digest(window), window[0].line, window[-1].line)
    yield from source


def too_long_instruction(job: EncodeJob, exc: WindowTooSmall) -> InputError:
    """A row whose own instruction leaves chunk windows no longer than --chunk-overlap, named by file and line."""
    line = getattr(exc.item, "line", None)
    return InputError(job.input, line, job.instruction_field, exc.reason)


def _warn_once(records: Iterable[Record], skipped: Skipped, job: EncodeJob) -> Iterator[Record]:
    """The records; the first time the reader reports an unused instruction field, a warning on stderr."""
    warned = False
    for record in records:
        if not warned and skipped.unused_instruction is not None:
            tqdm.write(f"warning: {skipped.unused_instruction.warning(job.input)}", file=sys.stderr)
            warned = True
        yield record


def main(argv: list[str] | None = None, on_point: PointHook | None = None) -> int:
    """The command: exit 0 done, 1 bad input data, 2 bad usage or configuration, 3 environment, 4 internal, 130."""
    job, args = _parse(argv)

    def body() -> int:
        summary = run(job, on_point)
        if not job.quiet:
            print(json.dumps(summary.as_dict(), indent=2))
        return exit_codes.OK

    return exit_codes.run_cli(
        body, prog="runtime.encode", known=KNOWN_ERRORS, debug=args.debug, os_hint=RESUME_HINT,
        on_interrupt="interrupted: run the same command again to resume",
    )


if __name__ == "__main__":
    sys.exit(main())
