"""Corpus encoding on Ray Data, for inputs that outgrow one GPU: ``python -m runtime.encode --ray ...``.

A streaming pipeline of four stages:

1. read: the input is cut into spans (``readers.plan_spans``: byte ranges at line breaks, parquet row groups) and
   each read task parses its span with the runtime's own readers, so rows carry the same line numbers and ids, and
   bad rows the same messages, as in the single-process CLI;
2. tokenize: CPU ``map_batches`` tasks with the bundle's tokenizer (the one instruction-aware code path);
3. encode: ``map_batches`` over an actor pool; each actor opens the engine once and batches rows by token budget;
   actors are restarted and their batches retried when a worker dies, so no row is lost or written twice;
4. write: Ray's parquet writer into a temp folder, renamed to OUTPUT when everything is written.

Shards hold ``line`` (int64), ``id`` (with ``--id-field``), per-row ``tokens`` and ``truncated`` (longer than
max_seq_length; with ``--long-text chunk`` such a row was split, not cut), ``chunk`` and ``span`` with
``--chunk-output all``, and ``embedding`` (a fixed-size list of the output dtype); they are not in input order:
sort by ``line`` (``read_output`` does).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from runtime.files.atomic import atomic_write_text
from runtime.bundle import EngineError, load_manifest, tokenizer_path
from runtime.deps import require
from runtime.job import EncodeJob, RayOptions, RunSummary
from runtime.files.locks import owned_temp_dir
from runtime.output_dtype import load_ranges
from runtime.chunking import WindowTooSmall
from runtime.encode import check_chunk_overlap
from runtime.files.readers import InputError, ReaderOptions, Skipped, Span, UnusedInstruction, input_format, plan_spans, read_records
from runtime.tokenization import Encoded, InstructionTokenizer
from runtime.files.writers import embedding_array

READ_BLOCK_ROWS = 4096
SKIPPED_DIR = "skipped"


def _ray():
    require("ray.data", "dist", "the --ray path (Ray Data)")
    return require("ray", "dist", "the --ray path (Ray Data)")


def _pa():
    import pyarrow as pa

    return pa


def _read_span(path: str, opts: ReaderOptions, index: int, span: Span, skipped_dir: str) -> Iterator[Any]:
    """One read task: the records of ``span`` as pyarrow tables; skipped rows go to a per-span JSON file."""
    pa = _pa()
    skipped = Skipped()
    records = read_records(path, opts, skipped, span)
    while True:
        chunk = [r for _, r in zip(range(READ_BLOCK_ROWS), records)]
        if not chunk:
            break
        columns = {
            "line": pa.array([r.line for r in chunk], type=pa.int64()),
            "text": pa.array([r.text for r in chunk], type=pa.string()),
            "instruction": pa.array([r.instruction for r in chunk], type=pa.string()),
        }
        if opts.id_field is not None:
            columns["id"] = pa.array([r.id for r in chunk], type=pa.string())
        yield pa.table(columns)
    unused = skipped.unused_instruction
    if skipped.count or skipped.blank_lines or unused:  # a retried task rewrites the same file: counts stay exact
        report = {"count": skipped.count, "lines": skipped.lines, "errors": skipped.first_errors,
                  "blank_lines": skipped.blank_lines, "unused_instruction": [unused.name, unused.line] if unused else None}
        atomic_write_text(Path(skipped_dir) / f"span-{index:08d}.json", json.dumps(report))


def _datasource(path: Path, opts: ReaderOptions, spans: list[Span], skipped_dir: Path):
    from ray.data import Datasource, ReadTask
    from ray.data.block import BlockMetadata

    class InputDatasource(Datasource):
        """The input file as Ray read tasks, one per span."""

        def estimate_inmemory_data_size(self) -> int:
            return path.stat().st_size

        def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None, data_context: Any = None) -> list:
            tasks = []
            for index, span in enumerate(spans):
                meta = BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None, input_files=(str(path),))
                read = lambda i=index, s=span: _read_span(str(path), opts, i, s, str(skipped_dir))  # noqa: E731
                tasks.append(ReadTask(read, meta))
            return tasks

    return InputDatasource()


@lru_cache(maxsize=4)
def _tokenizer(file: str, max_seq_length: int, do_lower_case: bool) -> InstructionTokenizer:
    return InstructionTokenizer(file, max_seq_length, do_lower_case)


def _tokenize(batch: Any, file: str, max_seq_length: int, do_lower_case: bool, truncate: bool) -> Any:
    """CPU stage: token ids, instruction counts and truncation flags of a batch of records (whole texts to chunk)."""
    pa = _pa()
    tok = _tokenizer(file, max_seq_length, do_lower_case)
    texts = batch.column("text").to_pylist()
    instructions = batch.column("instruction").to_pylist()
    encoded = tok.encode([t if i is None else [i, t] for i, t in zip(instructions, texts)], truncate=truncate)
    out = batch.drop_columns(["text", "instruction"])
    out = out.append_column("input_ids", pa.array(encoded.ids, type=pa.list_(pa.int32())))
    out = out.append_column("instruction_count", pa.array(encoded.instruction_count, type=pa.int64()))
    return out.append_column("truncated", pa.array(encoded.truncated, type=pa.bool_()))


def open_worker_encoder(job: EncodeJob, device: str | None) -> Any:
    """The engine of one worker; a ``.plan`` made for another GPU/TensorRT is refused, or rebuilt when allowed."""
    from runtime.backends.tensorrt import PlanTargetMismatch
    from runtime.encoder import Encoder

    options = {**job.encoder_options(), "verify_engine": False}  # the driver verified the file
    if "intra_op_threads" in options and not job.threads:
        options["intra_op_threads"] = 1  # by default one thread per actor: the actors share the machine's cores
    try:
        return Encoder(job.engine, device=device, **options)
    except PlanTargetMismatch:
        if not (job.ray and job.ray.build_on_worker):
            raise
    from runtime.backends.tensorrt_build import rebuild_for_this_gpu

    return Encoder(rebuild_for_this_gpu(load_manifest(job.engine)), device=device, **options)


class _EncodeActor:
    """Encode stage: one engine per actor, opened once; rows in, vectors out (same row order, or one per chunk)."""

    def __init__(self, job: EncodeJob, device: str | None, ranges: np.ndarray | None,
                 before_batch: Callable[[], None] | None) -> None:
        self.encoder = open_worker_encoder(job, device)
        self.job = job
        self.ranges = ranges
        self.before_batch = before_batch

    def __call__(self, batch: Any) -> Any:
        if self.before_batch is not None:  # a caller's probe, e.g. a test that kills the worker here
            self.before_batch()
        pa = _pa()
        encoded = Encoded(
            ids=batch.column("input_ids").to_pylist(),
            instruction_count=batch.column("instruction_count").to_numpy(),
            truncated=batch.column("truncated").to_numpy(zero_copy_only=False),
        )
        try:
            window = self.encoder.encode_tokenized(encoded, self.job.batch_size, keep_chunks=self.job.keep_chunks)
        except WindowTooSmall as exc:  # name the row by its line, as the single-process CLI does
            line = batch.column("line")[exc.row].as_py()
            raise InputError(self.job.input, line, self.job.instruction_field, exc.reason) from None
        out = batch.drop_columns(["input_ids", "instruction_count"])
        out = out.append_column("tokens", pa.array(encoded.lengths, type=pa.int32()))
        vectors = window.vectors
        if window.chunks is not None:  # one output row per chunk, after its row's columns
            c = window.chunks
            out = out.take(pa.array(c.row))
            out = out.append_column("chunk", pa.array(c.index, type=pa.int32()))
            out = out.append_column("span", pa.FixedSizeListArray.from_arrays(pa.array(c.span.reshape(-1), type=pa.int32()), 2))
            vectors = c.vectors
        return out.append_column("embedding", embedding_array(vectors, self.job.output_dtype, self.ranges))


def _unwrap(exc: BaseException) -> BaseException:
    """The user-level cause of a Ray task failure (an ``InputError`` keeps its file:line: field message).

    Ray re-raises a task's exception as ``RayTaskError(InputError)``, a subclass of both whose message is Ray's;
    the original travels in ``.cause``.
    """
    seen: BaseException | None = exc
    while seen is not None:
        if type(seen) in (InputError, EngineError):
            return seen
        seen = getattr(seen, "cause", None) or seen.__cause__
    return exc


def read_output(folder: str | Path) -> Any:
    """All shards of a Ray output folder as one pyarrow table in input order (sorted by ``line``)."""
    import pyarrow.parquet as pq

    files = sorted(Path(folder).glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"{folder}: no parquet shards")
    table = _pa().concat_tables(pq.read_table(f) for f in files)
    return table.sort_by("line")


def encode_with_ray(job: EncodeJob, before_batch: Callable[[], None] | None = None) -> RunSummary:
    """Encode ``job.input`` into the parquet folder ``job.output`` with Ray Data; the summary.

    Without ``job.ray.address`` a local Ray cluster is started on this machine. ``before_batch`` runs in the actor
    before every batch (a probe for tests). The caller holds the output's lock (``runtime.encode.run`` does).
    """
    ray = _ray()
    opts = job.ray or RayOptions()
    engine, output = job.engine, job.output
    manifest = load_manifest(engine, verify_engine=job.verify_engine)  # fail fast on the driver, before any cluster work
    input_format(job.input)
    check_chunk_overlap(job, InstructionTokenizer(tokenizer_path(engine), manifest.max_seq_length, manifest.do_lower_case))
    if output.suffix.lower() == ".npy":
        raise ValueError(f"{output}: with --ray the output is a folder of parquet shards, not a .npy file")
    if output.exists() and not job.overwrite:
        raise FileExistsError(f"{output} exists; pass --overwrite to replace it")
    on_gpu = manifest.kind == "tensorrt" or (manifest.kind == "pt2" and manifest.data.get("pt2", {}).get("device") == "cuda")
    gpus = (1.0 if on_gpu else 0.0) if opts.gpus_per_worker is None else float(opts.gpus_per_worker)
    spans = plan_spans(job.input, opts.span_bytes)
    output.parent.mkdir(parents=True, exist_ok=True)
    with owned_temp_dir(output.parent, f".{output.name}.tmp-") as work:
        staging, skipped_dir = work / "out", work / SKIPPED_DIR
        skipped_dir.mkdir()
        elapsed = _run_pipeline(ray, job, opts, manifest, spans, staging, skipped_dir, gpus, before_batch)
        staging.mkdir(exist_ok=True)  # an input with no rows writes no shard: still an (empty) output folder
        if output.exists():
            shutil.rmtree(output) if output.is_dir() else output.unlink()
        os.replace(staging, output)
        summary = _summary(job, skipped_dir, elapsed, manifest, opts.num_workers, gpus)
    summary.write()
    for warning in summary.warnings or ():
        print(f"warning: {warning}", file=sys.stderr)
    return summary


def _run_pipeline(ray: Any, job: EncodeJob, opts: RayOptions, manifest: Any, spans: list[Span], staging: Path,
                  skipped_dir: Path, gpus: float, before_batch: Callable[[], None] | None) -> float:
    """Read, tokenize, encode and write on Ray Data; the seconds it took. A task's ``InputError`` is re-raised."""
    started_here = False
    if not ray.is_initialized():
        cpus = None if opts.address else max(os.cpu_count() or 1, opts.num_workers + 1)
        ray.init(address=opts.address, num_cpus=cpus, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
        started_here = True
    logging.getLogger("ray.data").setLevel(logging.CRITICAL if job.quiet else logging.WARNING)  # failures are re-raised
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = not job.quiet
    ctx.print_on_execution_start = not job.quiet
    started = time.perf_counter()
    try:
        ds = ray.data.read_datasource(_datasource(job.input, job.reader_options(), spans, skipped_dir))
        ds = ds.map_batches(
            _tokenize, batch_format="pyarrow", batch_size=opts.rows_per_call,
            fn_kwargs={"file": str(tokenizer_path(job.engine)), "max_seq_length": manifest.max_seq_length,
                       "do_lower_case": manifest.do_lower_case, "truncate": job.long_text == "truncate"},
        )
        ranges = load_ranges(job.int8_ranges, manifest.embedding_dim) if job.int8_ranges else None
        ds = ds.map_batches(
            _EncodeActor, batch_format="pyarrow", batch_size=opts.rows_per_call,
            fn_constructor_kwargs={"job": job, "device": "cuda" if gpus else "cpu", "ranges": ranges,
                                   "before_batch": before_batch},
            compute=ray.data.ActorPoolStrategy(size=opts.num_workers), num_gpus=gpus, num_cpus=1 if not gpus else 0,
        )  # Ray Data restarts a dead actor and retries its batch (max_restarts=-1, max_task_retries=-1 by default)
        ds.write_parquet(str(staging))
    except Exception as exc:
        cause = _unwrap(exc)
        if cause is not exc:
            raise cause from None
        raise
    finally:
        if started_here:
            ray.shutdown()
    return time.perf_counter() - started


def _summary(job: EncodeJob, skipped_dir: Path, elapsed: float, manifest: Any, workers: int, gpus: float) -> RunSummary:
    import pyarrow.parquet as pq

    rows = tokens = long_rows = vectors = 0
    for shard in sorted(job.output.glob("*.parquet")):
        table = pq.read_table(shard, columns=["tokens", "truncated"] + (["chunk"] if job.keep_chunks else []))
        vectors += table.num_rows
        if job.keep_chunks:  # count each row once: at its first chunk
            table = table.filter(pa_compute().equal(table.column("chunk"), 0))
        rows += table.num_rows
        tokens += int(np.asarray(table.column("tokens")).sum())
        long_rows += int(np.asarray(table.column("truncated")).sum())
    chunked = job.long_text == "chunk"
    skipped = Skipped()
    for report in sorted(skipped_dir.glob("span-*.json")):
        part = json.loads(report.read_text())
        skipped.count += part["count"]
        skipped.lines += part["lines"]
        skipped.first_errors += part["errors"]
        skipped.blank_lines += part["blank_lines"]
        if part.get("unused_instruction"):
            found = UnusedInstruction(*part["unused_instruction"])
            first = skipped.unused_instruction
            if first is None or (found.line or 0) < (first.line or 0):
                skipped.unused_instruction = found
    return RunSummary.of(
        job, manifest, skipped, rows, tokens, 0 if chunked else long_rows, elapsed, rate=(rows, tokens, elapsed),
        workers=workers,
        gpus_per_worker=gpus,
        long_text=job.long_text if chunked else None,
        split_rows=long_rows if chunked else None,
        output_vectors=vectors if chunked else None,
        ranges=str(job.int8_ranges) if job.int8_ranges else None,
    )


def pa_compute() -> Any:
    import pyarrow.compute as pc

    return pc
