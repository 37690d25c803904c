"""``Encoder``: an engine bundle behind the ``INSTRUCTOR.encode`` interface, built for throughput.

Pipeline: a background thread takes the inputs a window at a time (``window`` rows), tokenizes the window with
``encode_batch`` (Rust, outside the GIL), sorts it by token count and cuts it into batches by a token budget
(``runtime.batching``), pads each batch to its own longest row, and hands the window to the engine thread through
a bounded queue; the engine thread runs the batches and writes each row back to its input position. Memory holds
at most ``queue_size + 2`` windows, whatever the input size, and the engine never waits on the tokenizer unless
tokenizing is the slower stage.
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

from runtime.backends import Backend, open_backend
from runtime.batching import BatchStats, plan_batches
from runtime.bundle import Manifest, load_manifest
from runtime.tokenization import Encoded, InputItem, InstructionTokenizer

T = TypeVar("T")

DEFAULT_WINDOW = 4096  # rows sorted together: large enough for < 10% padding, small enough to stream
DEFAULT_MAX_TOKENS = 16384  # padded tokens per batch, e.g. 32 rows of 512 or 512 rows of 32
DEFAULT_MAX_PADDING = 0.05  # a batch closes before more than this share of it would be padding


@dataclass
class Window(Generic[T]):
    """One window's results: the items as given, their vectors in the same order, and its counts."""

    items: list[T]
    vectors: np.ndarray  # float32 [len(items), dim]
    stats: BatchStats


@dataclass
class _Prepared(Generic[T]):
    items: list[T]
    batches: list[tuple[np.ndarray, dict[str, np.ndarray]]]  # (row positions in the window, padded feeds)
    stats: BatchStats


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


_DONE = object()


class Encoder:
    """Encode texts with an exported engine (``.onnx`` or ``.plan``); no torch involved.

    ``max_tokens`` bounds the padded tokens per batch, ``max_padding`` its share of padding, ``window`` the rows
    sorted together (see the module doc and ``runtime.batching``).
    ``onnx_options`` go to ONNX Runtime: ``intra_op_threads``, ``graph_optimization``, ``mem_arena``,
    ``allow_spinning`` (see ``runtime.backends.onnx.OnnxOptions``). ``verify_engine`` checks the engine file's
    sha256 against its manifest (once per file version: see ``runtime.bundle.verify_engine_file``).
    """

    def __init__(
        self,
        engine_path: str | Path,
        device: str | None = None,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        window: int = DEFAULT_WINDOW,
        max_padding: float = DEFAULT_MAX_PADDING,
        queue_size: int = 2,
        verify_engine: bool = True,
        **onnx_options: Any,
    ) -> None:
        if max_tokens < 1 or window < 1 or queue_size < 1:
            raise ValueError("max_tokens, window and queue_size must be >= 1")
        if not 0.0 <= max_padding < 1.0:
            raise ValueError(f"max_padding must be in [0, 1), got {max_padding}")
        self.manifest: Manifest = load_manifest(engine_path, verify_engine=verify_engine)
        self.tokenizer: InstructionTokenizer = self.manifest.tokenizer()
        self.backend: Backend = open_backend(self.manifest, device, **onnx_options)
        self.max_tokens = int(max_tokens)
        self.window = int(window)
        self.max_padding = float(max_padding)
        self.queue_size = int(queue_size)
        self.last_stats = BatchStats()

    @property
    def embedding_dim(self) -> int:
        return self.manifest.embedding_dim

    @property
    def max_seq_length(self) -> int:
        return self.manifest.max_seq_length

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
    ) -> np.ndarray | list[np.ndarray]:
        """``INSTRUCTOR.encode``: strings, ``[instruction, text]``, ``[instruction, text, k]`` in any mix.

        Returns float32 ``[n, dim]`` in input order (one vector for a single string). ``batch_size`` caps the rows
        per batch; ``max_tokens`` (default: the encoder's) caps the padded tokens per batch.
        """
        if output_value != "sentence_embedding":
            raise ValueError(
                f"output_value={output_value!r}: an engine computes sentence embeddings only "
                "(token embeddings need the PyTorch model, trainer.InstructorModel)"
            )
        if convert_to_tensor:
            raise ValueError("convert_to_tensor=True: the runtime has no torch; use torch.from_numpy(encoder.encode(...))")
        if device is not None and device.split(":")[0] != self.device:
            raise ValueError(f"device={device!r}: this encoder runs on {self.device}; choose the device in Encoder(...)")
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
        if single:
            return out[0]
        return out if convert_to_numpy else list(out)

    # -- streaming -----------------------------------------------------------------------------------------------

    def stream(
        self,
        items: Iterable[T],
        batch_size: int = 32,
        max_tokens: int | None = None,
        to_input: Callable[[T], InputItem] | None = None,
        on_batch: Callable[[int, int], None] | None = None,
    ) -> Iterator[Window[T]]:
        """Encode an iterable of any length, one ``Window`` (``self.window`` items, input order) at a time.

        ``to_input`` maps an item to an ``INSTRUCTOR.encode`` input (default: the item is one); ``on_batch(rows,
        tokens)`` is called after every engine batch (progress bars). Errors raised while reading or tokenizing
        ``items`` surface here, in the caller's thread.
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
                yield self._run(got, on_batch)
        finally:
            stop.set()
            worker.join()

    def encode_tokenized(
        self, encoded: Encoded, batch_size: int = 32, max_tokens: int | None = None
    ) -> tuple[np.ndarray, BatchStats]:
        """Vectors (in the given row order) of rows tokenized elsewhere, e.g. in a separate pipeline stage."""
        prepared = self._plan(list(range(len(encoded.ids))), encoded, self._max_rows(batch_size), int(max_tokens or self.max_tokens))
        window = self._run(prepared, None)
        return window.vectors, window.stats

    def _max_rows(self, batch_size: int) -> int:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        return batch_size if self.backend.max_rows is None else min(batch_size, self.backend.max_rows)

    def _prepare(self, chunk: list[T], inputs: list[InputItem], max_rows: int, max_tokens: int) -> _Prepared[T]:
        return self._plan(chunk, self.tokenizer.encode(inputs), max_rows, max_tokens)

    def _plan(self, chunk: list[T], encoded: Encoded, max_rows: int, max_tokens: int) -> _Prepared[T]:
        """Cut a tokenized window into length-sorted, padded batches."""
        lengths = encoded.lengths
        batches = []
        padded = 0
        for rows in plan_batches(lengths, max_rows, max_tokens, self.max_padding):
            feeds = self.tokenizer.pad(encoded.take(rows))
            padded += feeds["input_ids"].size
            batches.append((rows, feeds))
        stats = BatchStats(
            rows=len(chunk),
            tokens=int(lengths.sum()),
            padded_tokens=padded,
            truncated=int(encoded.truncated.sum()),
            batches=len(batches),
        )
        return _Prepared(items=chunk, batches=batches, stats=stats)

    def _run(self, prepared: _Prepared[T], on_batch: Callable[[int, int], None] | None) -> Window[T]:
        vectors = np.empty((len(prepared.items), self.embedding_dim), dtype=np.float32)
        for rows, feeds in prepared.batches:
            vectors[rows] = self.backend.run(feeds)
            if on_batch is not None:
                on_batch(len(rows), int(feeds["attention_mask"].sum()))
        return Window(items=prepared.items, vectors=vectors, stats=prepared.stats)

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
