"""Corpus encoding on Ray Data, for inputs that outgrow one GPU: ``python -m runtime.encode --ray ...``.

A streaming pipeline of four stages:

1. read: the input is cut into spans (``readers.plan_spans``: byte ranges at line breaks, parquet row groups) and
   each read task parses its span with the runtime's own readers, so rows carry the same line numbers and ids, and
   bad rows the same messages, as in the single-process CLI;
2. tokenize: CPU ``map_batches`` tasks with the bundle's tokenizer (the one instruction-aware code path);
3. encode: ``map_batches`` over an actor pool; each actor opens the engine once and batches rows by token budget;
   actors are restarted and their batches retried when a worker dies, so no row is lost or written twice;
4. write: Ray's parquet writer into a temp folder, renamed to OUTPUT when everything is written.

Shards hold ``line`` (int64), ``id`` (with ``--id-field``), ``embedding`` (fixed-size list), and per-row ``tokens``
and ``truncated``; they are not in input order: sort by ``line`` (``read_output`` does).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import time
import uuid
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from runtime.bundle import EngineError, atomic_write_text, load_manifest, tokenizer_path
from runtime.readers import InputError, ReaderOptions, Skipped, Span, input_format, plan_spans, read_records
from runtime.tokenization import Encoded, InstructionTokenizer

RAY_INSTALL_HINT = "the --ray path needs Ray Data: pip install 'instructor-stack[dist]'"
READ_BLOCK_ROWS = 4096
DEFAULT_ROWS_PER_CALL = 1024  # rows an actor encodes per call: enough to batch well, small enough to balance actors
SKIPPED_DIR = "_skipped"
TEST_KILL_ENV = "RUNTIME_RAY_TEST_KILL_ONCE"  # test-only: a marker path; the first actor to see it absent dies


def _ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise EngineError(RAY_INSTALL_HINT) from exc
    return ray


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
    if skipped.count:  # a retried task rewrites the same file: counts stay exact
        report = {"count": skipped.count, "lines": skipped.lines, "errors": skipped.first_errors}
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


def _tokenize(batch: Any, file: str, max_seq_length: int, do_lower_case: bool) -> Any:
    """CPU stage: token ids, instruction counts and truncation flags of a batch of records."""
    pa = _pa()
    tok = _tokenizer(file, max_seq_length, do_lower_case)
    texts = batch.column("text").to_pylist()
    instructions = batch.column("instruction").to_pylist()
    encoded = tok.encode([t if i is None else [i, t] for i, t in zip(instructions, texts)])
    out = batch.drop_columns(["text", "instruction"])
    out = out.append_column("input_ids", pa.array(encoded.ids, type=pa.list_(pa.int32())))
    out = out.append_column("instruction_count", pa.array(encoded.instruction_count, type=pa.int64()))
    return out.append_column("truncated", pa.array(encoded.truncated, type=pa.bool_()))


def open_worker_encoder(engine: str, device: str | None, max_tokens: int, threads: int, build_on_worker: bool) -> Any:
    """The engine of one worker; a ``.plan`` made for another GPU/TensorRT is refused, or rebuilt when allowed."""
    from runtime.backends.tensorrt import PlanTargetMismatch
    from runtime.encoder import Encoder

    options = {"intra_op_threads": threads} if engine.lower().endswith(".onnx") else {}
    try:
        return Encoder(engine, device=device, max_tokens=max_tokens, **options)
    except PlanTargetMismatch:
        if not build_on_worker:
            raise
    from runtime.backends.tensorrt_build import rebuild_for_this_gpu

    return Encoder(rebuild_for_this_gpu(load_manifest(engine)), device=device, max_tokens=max_tokens)


class _EncodeActor:
    """Encode stage: one engine per actor, opened once; rows in, vectors out (same row order)."""

    def __init__(self, engine: str, device: str | None, batch_size: int, max_tokens: int, dtype: str,
                 threads: int, build_on_worker: bool, kill_marker: str | None) -> None:
        self.encoder = open_worker_encoder(engine, device, max_tokens, threads, build_on_worker)
        self.batch_size = batch_size
        self.dtype = np.dtype(dtype)
        self.kill_marker = kill_marker

    def __call__(self, batch: Any) -> Any:
        if self.kill_marker and not os.path.exists(self.kill_marker):
            Path(self.kill_marker).write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)  # test-only: a worker dying mid-run
        pa = _pa()
        ids = batch.column("input_ids").to_pylist()
        encoded = Encoded(
            ids=ids,
            instruction_count=batch.column("instruction_count").to_numpy(),
            truncated=batch.column("truncated").to_numpy(zero_copy_only=False),
        )
        vectors, _ = self.encoder.encode_tokenized(encoded, self.batch_size)
        value_type = pa.float16() if self.dtype == np.float16 else pa.float32()
        flat = pa.array(vectors.astype(self.dtype).reshape(-1), type=value_type)
        out = batch.drop_columns(["input_ids", "instruction_count", "truncated"])
        out = out.append_column("embedding", pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1]))
        out = out.append_column("tokens", pa.array(encoded.lengths, type=pa.int32()))
        return out.append_column("truncated", batch.column("truncated"))


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


def encode_with_ray(
    engine: str | Path,
    input_path: str | Path,
    output: str | Path,
    opts: ReaderOptions | None = None,
    num_workers: int = 1,
    gpus_per_worker: float | None = None,
    ray_address: str | None = None,
    batch_size: int = 64,
    max_tokens: int = 16384,
    dtype: str = "float32",
    threads: int = 1,
    span_bytes: int = 64 << 20,
    rows_per_call: int = DEFAULT_ROWS_PER_CALL,
    overwrite: bool = False,
    quiet: bool = False,
    build_on_worker: bool = False,
) -> dict[str, Any]:
    """Encode ``input_path`` into the parquet folder ``output`` with ``num_workers`` engine actors; the summary.

    Without ``ray_address`` a local Ray cluster is started on this machine. ``gpus_per_worker`` defaults to 1 for a
    ``.plan`` engine and 0 for ``.onnx``.
    """
    ray = _ray()
    opts = opts or ReaderOptions()
    input_path, output = Path(input_path), Path(output)
    engine = str(engine)
    manifest = load_manifest(engine)  # fail fast on the driver, before any cluster work
    input_format(input_path)
    if output.suffix.lower() == ".npy":
        raise ValueError(f"{output}: with --ray the output is a folder of parquet shards, not a .npy file")
    if output.exists():
        if not overwrite:
            raise FileExistsError(f"{output} exists; pass --overwrite to replace it")
        shutil.rmtree(output) if output.is_dir() else output.unlink()
    gpus = (1.0 if manifest.kind == "tensorrt" else 0.0) if gpus_per_worker is None else float(gpus_per_worker)
    spans = plan_spans(input_path, span_bytes)
    staging = output.with_name(f".{output.name}.tmp-{uuid.uuid4().hex[:8]}")
    skipped_dir = staging.with_name(staging.name + SKIPPED_DIR)
    skipped_dir.mkdir(parents=True)
    started_here = False
    if not ray.is_initialized():
        cpus = None if ray_address else max(os.cpu_count() or 1, num_workers + 1)
        ray.init(address=ray_address, num_cpus=cpus, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
        started_here = True
    logging.getLogger("ray.data").setLevel(logging.CRITICAL if quiet else logging.WARNING)  # failures are re-raised
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = not quiet
    ctx.print_on_execution_start = not quiet
    started = time.perf_counter()
    try:
        ds = ray.data.read_datasource(_datasource(input_path, opts, spans, skipped_dir))
        ds = ds.map_batches(
            _tokenize, batch_format="pyarrow", batch_size=rows_per_call,
            fn_kwargs={"file": str(tokenizer_path(engine)), "max_seq_length": manifest.max_seq_length,
                       "do_lower_case": manifest.do_lower_case},
        )
        ds = ds.map_batches(
            _EncodeActor, batch_format="pyarrow", batch_size=rows_per_call,
            fn_constructor_kwargs={"engine": engine, "device": "cuda" if gpus else "cpu", "batch_size": batch_size,
                                   "max_tokens": max_tokens, "dtype": dtype, "threads": threads,
                                   "build_on_worker": build_on_worker, "kill_marker": os.environ.get(TEST_KILL_ENV)},
            compute=ray.data.ActorPoolStrategy(size=num_workers), num_gpus=gpus, num_cpus=1 if not gpus else 0,
        )  # Ray Data restarts a dead actor and retries its batch (max_restarts=-1, max_task_retries=-1 by default)
        ds.write_parquet(str(staging))
    except Exception as exc:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(skipped_dir, ignore_errors=True)
        cause = _unwrap(exc)
        if cause is not exc:
            raise cause from None
        raise
    finally:
        if started_here:
            ray.shutdown()
    elapsed = time.perf_counter() - started
    staging.mkdir(exist_ok=True)  # an input with no rows writes no shard: still an (empty) output folder
    os.replace(staging, output)
    summary = _summary(output, skipped_dir, elapsed, engine, manifest, num_workers, gpus, dtype)
    shutil.rmtree(skipped_dir, ignore_errors=True)
    atomic_write_text(Path(f"{output}.summary.json"), json.dumps(summary, indent=2) + "\n")
    return summary


def _summary(output: Path, skipped_dir: Path, elapsed: float, engine: str, manifest: Any, workers: int,
             gpus: float, dtype: str) -> dict[str, Any]:
    import pyarrow.parquet as pq

    rows = tokens = truncated = 0
    for shard in sorted(output.glob("*.parquet")):
        table = pq.read_table(shard, columns=["tokens", "truncated"])
        rows += table.num_rows
        tokens += int(np.asarray(table.column("tokens")).sum())
        truncated += int(np.asarray(table.column("truncated")).sum())
    skipped: dict[str, Any] = {"count": 0, "lines": [], "errors": []}
    for report in sorted(skipped_dir.glob("span-*.json")):
        part = json.loads(report.read_text())
        skipped["count"] += part["count"]
        skipped["lines"] += part["lines"]
        skipped["errors"] += part["errors"]
    return {
        "output": str(output),
        "rows": rows,
        "tokens": tokens,
        "truncated_rows": truncated,
        "skipped_rows": skipped["count"],
        "skipped_lines": skipped["lines"][:1000],
        "skipped_errors": skipped["errors"][:10],
        "elapsed_s": round(elapsed, 3),
        "docs_per_s": round(rows / max(elapsed, 1e-9), 2),
        "tokens_per_s": round(tokens / max(elapsed, 1e-9), 1),
        "workers": workers,
        "gpus_per_worker": gpus,
        "dtype": dtype,
        "engine": engine,
        "engine_manifest_sha256": manifest.sha256,
        "precision": manifest.precision,
    }
