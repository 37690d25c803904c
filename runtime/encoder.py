"""``Encoder``: an engine bundle behind the ``INSTRUCTOR.encode`` interface, built for throughput.

Pipeline: a background thread takes the inputs a window at a time (``window`` rows), tokenizes the window with
``encode_batch`` (Rust, outside the GIL), sorts it by token count and cuts it into batches by a token budget
(``runtime.batching``), pads each batch to its own longest row (or, for an engine whose race found widths in
multiples of 16 faster, to that width: ``length_multiple``), and hands the window to the engine thread through
a bounded queue; the engine thread runs the batches and writes each row back to its input position. Memory holds
at most ``queue_size + 2`` windows, whatever the input size, and the engine never waits on the tokenizer unless
tokenizing is the slower stage.

With ``long_text="chunk"`` a row longer than ``max_seq_length`` becomes overlapping chunks that each repeat its
instruction (``runtime.chunking``); the chunks are batched with every other row of the window, and combined into
the row's vector (or kept, one vector per chunk). ``output_dtype`` (``runtime.output_dtype``) makes the vectors
smaller after that.
"""

from __future__ import annotations

import itertools
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Generic, Iterable, Iterator, Sequence, TypeVar

import numpy as np
from tqdm.auto import tqdm

from runtime import chunking, cpu_engines
from runtime.output_dtype import NEEDS_RANGES, calibration_ranges, check_output_dtype, quantize
from runtime.backends import Backend
from runtime.batching import BatchStats, aligned, plan_batches
from runtime.bundle import Manifest, load_manifest
from runtime.tokenization import Encoded, InputItem, InstructionTokenizer

T = TypeVar("T")

DEFAULT_WINDOW = 4096  # rows sorted together: large enough for < 10% padding, small enough to stream
DEFAULT_MAX_TOKENS = 16384  # padded tokens per batch on the CPU, e.g. 32 rows of 512; GPU backends suggest more
DEFAULT_MAX_PADDING = 0.05  # a batch closes before more than this share of it would be padding


@dataclass
class ChunkVectors:
    """One vector per chunk (``long_text="chunk"``): the row (position in the window or call) and chunk number of
    each, and its ``[start, end)`` token span in the row's whole token sequence."""

    row: np.ndarray  # int64 [chunks]
    index: np.ndarray  # int64 [chunks]
    span: np.ndarray  # int64 [chunks, 2]
    vectors: np.ndarray  # float32 [chunks, dim]


@dataclass
class Window(Generic[T]):
    """One window's results: the items as given, their vectors in the same order, and its counts."""

    items: list[T]
    vectors: np.ndarray  # float32 [len(items), dim]
    stats: BatchStats
    chunks: ChunkVectors | None = None  # with stream(keep_chunks=True) and long_text="chunk"


@dataclass
class _Prepared(Generic[T]):
    items: list[T]
    batches: list[tuple[np.ndarray, dict[str, np.ndarray]]]  # (unit positions in the window, padded feeds)
    stats: BatchStats
    chunks: chunking.Chunks | None  # the units are these chunks (long_text="chunk"), else the rows themselves


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


_DONE = object()


class Encoder:
    """Encode texts with an exported engine (``.onnx``, ``.plan`` or ``.pt2``); no torch involved but for ``.pt2``.

    ``max_tokens`` bounds the padded tokens per batch (default: the backend's, GPU-sized on CUDA, else
    ``DEFAULT_MAX_TOKENS``), ``max_padding`` its share of padding, ``window`` the rows sorted together (see the module
    doc and ``runtime.batching``).
    ``onnx_options`` go to ONNX Runtime: ``intra_op_threads``, ``graph_optimization``, ``mem_arena``,
    ``allow_spinning`` (see ``runtime.backends.onnx.OnnxOptions``). ``verify_engine`` checks the engine file's
    sha256 against its manifest (once per file version: see ``runtime.bundle.verify_engine_file``).
    ``long_text`` is ``"truncate"`` (the reference's behaviour) or ``"chunk"`` (``chunk_overlap`` tokens shared by
    neighbouring chunks, combined by ``chunk_pooling``: see ``runtime.chunking``).
    ``precision``: which engine of a ``--precision auto`` bundle runs (``auto``: the fastest that passed its gate on
    this CPU; ``fp32``, ``bf16``, ``int8`` or an engine's name: the fastest of those; ``runtime.cpu_engines``);
    ``engine_choice`` says which one and how it was chosen. A bundle of one engine runs that engine.
    ``length_multiple``: batches are padded to widths in multiples of it (``runtime.batching.aligned``); default: the
    chosen engine's, from its race (``engine_choice.length_multiple``); 1 pads to the longest row.
    """

    def __init__(
        self,
        engine_path: str | Path,
        device: str | None = None,
        max_tokens: int | None = None,
        window: int = DEFAULT_WINDOW,
        max_padding: float = DEFAULT_MAX_PADDING,
        queue_size: int = 2,
        verify_engine: bool = True,
        long_text: str = "truncate",
        chunk_overlap: int = chunking.DEFAULT_OVERLAP,
        chunk_pooling: str = "mean",
        precision: str = "auto",
        length_multiple: int | None = None,
        **onnx_options: Any,
    ) -> None:
        if (max_tokens is not None and max_tokens < 1) or window < 1 or queue_size < 1:
            raise ValueError("max_tokens, window and queue_size must be >= 1")
        if length_multiple is not None and length_multiple < 1:
            raise ValueError(f"length_multiple must be >= 1, got {length_multiple}")
        if not 0.0 <= max_padding < 1.0:
            raise ValueError(f"max_padding must be in [0, 1), got {max_padding}")
        chunking.check_options(long_text, chunk_overlap, chunk_pooling)
        self.long_text = long_text
        self.chunk_overlap = int(chunk_overlap)
        self.chunk_pooling = chunk_pooling
        self.manifest: Manifest = load_manifest(engine_path, verify_engine=verify_engine)
        self.tokenizer: InstructionTokenizer = self.manifest.tokenizer()
        threads = int(onnx_options.get("intra_op_threads") or 0)
        self.engine_choice: cpu_engines.Choice = cpu_engines.choose(self.manifest, precision, device, threads)
        self.backend: Backend = cpu_engines.open_choice(self.manifest, self.engine_choice, device, threads, **onnx_options)
        self.max_tokens = int(max_tokens or self.backend.default_max_tokens or DEFAULT_MAX_TOKENS)
        self.length_multiple = int(length_multiple or self.engine_choice.length_multiple)
        self.window = int(window)
        self.max_padding = float(max_padding)
        self.queue_size = int(queue_size)
        self.last_stats = BatchStats()

    @property
    def embedding_dim(self) -> int:
        return self.manifest.embedding_dim

    @property
    def max_seq_length(self) -> int:
        """Tokens a text is cut at (long_text="truncate") or chunked by; the manifest's unless set lower."""
        return self.tokenizer.max_seq_length

    @max_seq_length.setter
    def max_seq_length(self, value: int) -> None:
        limit = self.manifest.max_seq_length
        if isinstance(value, int) and not isinstance(value, bool) and value > limit:
            raise ValueError(f"max_seq_length={value}: this engine was exported and checked for at most {limit} tokens")
        self.tokenizer = self.tokenizer.with_max_seq_length(value)

    @property
    def device(self) -> str:
        return self.backend.device

    def __repr__(self) -> str:
        return f"Encoder({str(self.manifest.engine)!r}, {self.backend.name}, dim={self.embedding_dim})"

    # -- INSTRUCTOR.encode ---------------------------------------------------------------------------------------

    def encode(
        self,
        sentences: str | Sequence[InputItem],
        batch_size: int = 32,
        show_progress_bar: bool | None = None,
        output_value: str = "sentence_embedding",
        convert_to_numpy: bool = True,
        convert_to_tensor: bool = False,
        device: str | None = None,
        normalize_embeddings: bool = False,
        max_tokens: int | None = None,
        output_dtype: str = "float32",
        ranges: np.ndarray | None = None,
    ) -> np.ndarray | list[np.ndarray]:
        """``INSTRUCTOR.encode``: strings, ``[instruction, text]``, ``[instruction, text, k]`` in any mix.

        Returns ``[n, dim]`` in input order (one vector for a single string), float32 unless ``output_dtype`` says
        otherwise (``runtime.output_dtype``; int8/uint8 take ``ranges``, by default those of these vectors).
        ``batch_size`` caps the rows per batch; ``max_tokens`` (default: the encoder's) the padded tokens per batch.
        """
        check_output_dtype(output_dtype)
        self._check_encode_options(output_value, convert_to_tensor, device)
        single = isinstance(sentences, str)
        items = [sentences] if single else list(sentences)
        out = np.empty((len(items), self.embedding_dim), dtype=np.float32)
        stats = BatchStats()
        bar = tqdm(total=len(items), desc="Encoding", unit="doc", disable=not show_progress_bar)
        pos = 0
        with bar:
            for win in self.stream(items, batch_size, max_tokens, on_batch=lambda rows, _t: bar.update(rows)):
                out[pos : pos + len(win.items)] = win.vectors
                pos += len(win.items)
                stats = stats + win.stats
        self.last_stats = stats
        if normalize_embeddings:
            out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), np.float32(1e-12))
        if output_dtype in NEEDS_RANGES and ranges is None:
            ranges = calibration_ranges(out)
        out = quantize(out, output_dtype, ranges)
        if single:
            return out[0]
        return out if convert_to_numpy else list(out)

    def encode_chunks(
        self, sentences: Sequence[InputItem], batch_size: int = 32, max_tokens: int | None = None
    ) -> ChunkVectors:
        """One float32 vector per chunk of every input (``long_text="chunk"``), with its row, number and span."""
        if self.long_text != "chunk":
            raise ValueError('encode_chunks needs an Encoder(..., long_text="chunk")')
        parts = []
        offset = 0
        for win in self.stream(list(sentences), batch_size, max_tokens, keep_chunks=True):
            c = win.chunks
            parts.append(ChunkVectors(c.row + offset, c.index, c.span, c.vectors))
            offset += len(win.items)
        if not parts:
            empty = np.zeros(0, dtype=np.int64)
            return ChunkVectors(empty, empty, np.zeros((0, 2), np.int64), np.zeros((0, self.embedding_dim), np.float32))
        return ChunkVectors(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("row", "index", "span", "vectors")))

    def _check_encode_options(self, output_value: str, convert_to_tensor: bool, device: str | None) -> None:
        if output_value != "sentence_embedding":
            raise ValueError(
                f"output_value={output_value!r}: an engine computes sentence embeddings only "
                "(token embeddings need the PyTorch model, trainer.InstructorModel)"
            )
        if convert_to_tensor:
            raise ValueError("convert_to_tensor=True: the runtime has no torch; use torch.from_numpy(encoder.encode(...))")
        if device is not None and device.split(":")[0] != self.device:
            raise ValueError(f"device={device!r}: this encoder runs on {self.device}; choose the device in Encoder(...)")

    # -- streaming -----------------------------------------------------------------------------------------------

    def stream(
        self,
        items: Iterable[T],
        batch_size: int = 32,
        max_tokens: int | None = None,
        to_input: Callable[[T], InputItem] | None = None,
        on_batch: Callable[[int, int], None] | None = None,
        keep_chunks: bool = False,
    ) -> Iterator[Window[T]]:
        """Encode an iterable of any length, one ``Window`` (``self.window`` items, input order) at a time.

        ``to_input`` maps an item to an ``INSTRUCTOR.encode`` input (default: the item is one); ``on_batch(rows,
        tokens)`` is called after every engine batch (progress bars). ``keep_chunks`` adds each chunk's vector to
        the window (``long_text="chunk"``). Errors raised while reading or tokenizing ``items`` surface here, in
        the caller's thread.
        """
        max_rows = self._max_rows(batch_size)
        budget = int(max_tokens or self.max_tokens)
        convert = to_input or (lambda item: item)
        ready: queue.Queue = queue.Queue(maxsize=self.queue_size)
        stop = threading.Event()

        def produce() -> None:
            try:
                source = iter(items)
                while chunk := list(itertools.islice(source, self.window)):
                    prepared = self._prepare(chunk, [convert(x) for x in chunk], max_rows, budget)
                    if not _put(ready, prepared, stop):
                        return
                _put(ready, _DONE, stop)
            except BaseException as exc:  # handed to the consumer, which re-raises it
                _put(ready, _Failure(exc), stop)

        worker = threading.Thread(target=produce, name="runtime-tokenizer", daemon=True)
        worker.start()
        try:
            while (got := ready.get()) is not _DONE:
                if isinstance(got, _Failure):
                    raise got.exc
                yield self._run(got, on_batch, keep_chunks)
        finally:
            stop.set()
            worker.join()

    def encode_tokenized(
        self,
        encoded: Encoded,
        batch_size: int = 32,
        max_tokens: int | None = None,
        keep_chunks: bool = False,
        on_batch: Callable[[int, int], None] | None = None,
    ) -> Window[int]:
        """Vectors (in the given row order) of rows tokenized elsewhere, e.g. in a separate pipeline stage.

        With ``long_text="chunk"`` the rows must be tokenized whole (``tokenizer.encode(..., truncate=False)``).
        ``on_batch(rows, tokens)`` is called after every engine batch (the server's per-batch metrics).
        """
        prepared = self._plan(list(range(len(encoded.ids))), encoded, self._max_rows(batch_size), int(max_tokens or self.max_tokens))
        return self._run(prepared, on_batch, keep_chunks)

    def _max_rows(self, batch_size: int) -> int:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        return batch_size if self.backend.max_rows is None else min(batch_size, self.backend.max_rows)

    def _prepare(self, chunk: list[T], inputs: list[InputItem], max_rows: int, max_tokens: int) -> _Prepared[T]:
        encoded = self.tokenizer.encode(inputs, truncate=self.long_text == "truncate")
        return self._plan(chunk, encoded, max_rows, max_tokens)

    def _plan(self, items: list[T], encoded: Encoded, max_rows: int, max_tokens: int) -> _Prepared[T]:
        """Cut a tokenized window (rows, or their chunks) into length-sorted, padded batches."""
        chunks = None
        units = encoded
        if self.long_text == "chunk":
            head, tail = self.tokenizer.special_tokens
            try:
                chunks = chunking.split(encoded, self.max_seq_length, self.chunk_overlap, len(head), len(tail))
            except chunking.WindowTooSmall as exc:  # say which item: a caller may know its file and line
                exc.item = items[exc.row]
                raise
            units = chunks.encoded
        lengths = units.lengths
        widths = aligned(lengths, self.length_multiple, self.max_seq_length)  # what each row costs the engine
        batches = []
        padded = 0
        for rows in plan_batches(widths, max_rows, max_tokens, self.max_padding):
            feeds = self.tokenizer.pad(units.take(rows), int(widths[rows].max()))
            padded += feeds["input_ids"].size
            batches.append((rows, feeds))
        stats = BatchStats(
            rows=len(items),
            tokens=int(lengths.sum()),
            padded_tokens=padded,
            truncated=int(units.truncated.sum()),
            batches=len(batches),
            chunks=len(lengths),
            split_rows=chunks.split_rows if chunks is not None else 0,
        )
        return _Prepared(items=items, batches=batches, stats=stats, chunks=chunks)

    def _run(
        self, prepared: _Prepared[T], on_batch: Callable[[int, int], None] | None, keep_chunks: bool = False
    ) -> Window[T]:
        chunks = prepared.chunks
        vectors = np.empty((len(chunks.row) if chunks else len(prepared.items), self.embedding_dim), dtype=np.float32)
        for (rows, feeds), out in zip(prepared.batches, cpu_engines.run_each(self.backend, [f for _, f in prepared.batches])):
            vectors[rows] = out
            if on_batch is not None:  # a row counts as done with its first chunk: the total stays the row count
                done = len(rows) if chunks is None else int(np.count_nonzero(chunks.index[rows] == 0))
                on_batch(done, int(feeds["attention_mask"].sum()))
        if chunks is None:
            return Window(items=prepared.items, vectors=vectors, stats=prepared.stats)
        normalize = bool(self.manifest.data.get("normalize", True))
        rows = chunking.combine(vectors, chunks, len(prepared.items), self.chunk_pooling, normalize)
        kept = ChunkVectors(chunks.row, chunks.index, chunks.span, vectors) if keep_chunks else None
        return Window(items=prepared.items, vectors=rows, stats=prepared.stats, chunks=kept)

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> "Encoder":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _put(q: queue.Queue, item: object, stop: threading.Event) -> bool:
    """Put unless the consumer has gone away (so an abandoned stream never leaves a blocked thread behind)."""
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False
