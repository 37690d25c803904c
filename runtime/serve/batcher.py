"""Dynamic batching: engine threads run the items of every waiting request through the engines together.

A request's items, already tokenized, enter one shared queue as a *job*. Each engine thread (one per engine:
``--replicas`` on a CPU, one per listed GPU) repeatedly takes a *pool* of rows from the waiting jobs and hands it to
``Encoder.encode_tokenized``, which cuts it into length-sorted, padded batches with the runtime's token-budget
planner (``runtime.batching``); each row's vector goes back to its request, in the request's order, and a request
is answered when its last row is done.

- Pool: at most ``max_batch_size`` rows and ``max_batch_tokens`` real tokens (one row always fits). Jobs are taken
  first come, first served, but in a first pass each job gives at most half a pool; the rest of the pool is then
  filled in the same order. So a 1,000-item request takes about half of every pool while others wait, and a 1-item
  request behind it is in the next pool: neither starves. With several engines, a pool holds about the waiting
  tokens shared out among the engines that are waiting for work, so that one does not take all 16 rows of 16 clients
  while another idles, and the halves of a lone request finish together.
- Waiting: a pool starts at once when it is full. Otherwise the thread waits for more rows only while more are on
  their way (a request is being read or tokenized, or fewer requests wait than took part in the previous pool),
  and never longer than ``max_wait_ms`` after the oldest waiting job arrived. A lone client thus never waits, and
  concurrent clients fill the batches.
- Backpressure: ``submit`` refuses a job (``QueueFull``, with a retry delay from the measured token rate) when the
  tokens waiting would pass ``max_queue_tokens``; a job that arrives at an empty queue is always taken, so a large
  request is slow rather than refused forever. ``room_for`` asks the same before a request is parsed, and
  ``on_room`` is called whenever tokens leave the queue, so that the server can let waiting requests in.
- Cancellation: ``cancel`` drops the rows of a job whose client has gone, so abandoned work is not computed.
- Shutdown: ``close`` refuses new jobs, runs every job already taken, then stops the threads.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np

from runtime.encoder import Encoder
from runtime.serve.metrics import Metrics
from runtime.tokenization import Encoded


class QueueFull(Exception):
    """Too many tokens are waiting; ``retry_after`` (seconds) is an estimate of when there will be room."""

    def __init__(self, queued: int, limit: int, retry_after: int) -> None:
        super().__init__(f"{queued} tokens are waiting for the engine (limit {limit}, --max-queue-tokens)")
        self.retry_after = retry_after


class ShuttingDown(Exception):
    """The batcher no longer takes jobs (shutting down, or an engine thread has stopped)."""


@dataclass(eq=False)
class Job:
    """One request's rows; ``future`` gets their float32 ``[rows, dim]`` vectors (never, once cancelled)."""

    encoded: Encoded
    lengths: np.ndarray
    vectors: np.ndarray
    future: Future
    enqueued: float
    next_row: int = 0  # rows before this one have been taken into a pool
    done: int = 0  # rows whose vectors are in ``vectors``
    started: bool = False
    cancelled: bool = False

    @property
    def rows(self) -> int:
        return len(self.lengths)


@dataclass
class Arrival:
    """One announced request (``Batcher.arriving``); ``submit`` counts it out, so the wait for it ends at once."""

    counted_out: bool = False


@dataclass
class _Pool:
    spans: list[tuple[Job, int, int]] = field(default_factory=list)  # (job, first row, end row)
    rows: int = 0
    tokens: int = 0


class Batcher:
    """The shared queue and one engine thread per encoder (see the module doc)."""

    def __init__(
        self,
        encoders: Sequence[Encoder],
        metrics: Metrics,
        max_batch_size: int = 32,
        max_batch_tokens: int = 16384,
        max_wait_ms: float = 5.0,
        max_queue_tokens: int = 262144,
        on_room: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``clock``: the seconds that ``max_wait_ms`` is counted in (tests pass one they advance themselves)."""
        self.encoders = list(encoders)
        if not self.encoders:
            raise ValueError("a batcher needs at least one encoder")
        dims = {e.embedding_dim for e in self.encoders}
        if len(dims) != 1:
            raise ValueError(f"the engines give vectors of different sizes: {sorted(dims)}")
        self.embedding_dim = dims.pop()
        engine_rows = [e.backend.max_rows for e in self.encoders if e.backend.max_rows]
        self.metrics = metrics
        self.max_rows = min([max_batch_size, *engine_rows])
        self.max_batch_tokens = max_batch_tokens
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue_tokens = max_queue_tokens
        self._on_room = on_room  # called (from an engine thread) whenever queued tokens leave: requests waiting for room
        self._clock = clock
        self._cond = threading.Condition()
        self._pending: deque[Job] = deque()
        self._queued_rows = 0
        self._queued_tokens = 0
        self._arriving = 0
        self._idle = 0  # engine threads waiting for a pool
        self._last_pool_jobs = 0
        self._rates = [0.0] * len(self.encoders)  # tokens/s of each engine (moving average)
        self._stopping = False
        self._threads = [threading.Thread(target=self._loop, args=(i,), name=f"serve-engine-{i}", daemon=True)
                         for i in range(len(self.encoders))]

    # -- the request side (event loop and tokenizer threads) -------------------------------------------------------

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    @property
    def alive(self) -> bool:
        return not self._stopping and all(t.is_alive() for t in self._threads)

    @contextmanager
    def arriving(self) -> Iterator[Arrival]:
        """Around reading and tokenizing a request: tells the engine threads that more rows are coming, until the
        request is submitted (pass the ``Arrival`` to ``submit``) or the block ends."""
        arrival = Arrival()
        with self._cond:
            self._arriving += 1
        try:
            yield arrival
        finally:
            with self._cond:
                self._count_out(arrival)
                self._cond.notify_all()

    def _count_out(self, arrival: Arrival | None) -> None:
        if arrival is not None and not arrival.counted_out:
            arrival.counted_out = True
            self._arriving -= 1

    def submit(self, encoded: Encoded, arrival: Arrival | None = None, let_in: bool = False) -> Job:
        """Queue one request's rows (from any thread); ``job.future`` gets their vectors. ``let_in``: the caller has
        already applied the queue limit to this request (``room_for`` with its estimated tokens), so it is not
        refused here for the estimate's error."""
        lengths = encoded.lengths
        tokens = int(lengths.sum())
        job = Job(encoded, lengths, np.empty((len(lengths), self.embedding_dim), np.float32), Future(), self._clock())
        job.future.set_running_or_notify_cancel()  # from now on it cannot be cancelled, so setting its result never races
        with self._cond:
            self._count_out(arrival)
            if not self.alive:
                raise ShuttingDown("the server is shutting down")
            if not let_in and self._queued_tokens and self._queued_tokens + tokens > self.max_queue_tokens:
                raise QueueFull(self._queued_tokens, self.max_queue_tokens, self._retry_after())
            if not job.rows:
                job.future.set_result(job.vectors)
                return job
            self._pending.append(job)
            self._queued_rows += job.rows
            self._queued_tokens += tokens
            self._publish_queue()
            self._cond.notify_all()
        return job

    def room_for(self, tokens: int, reserved: int = 0) -> bool:
        """Whether about ``tokens`` more fit under ``max_queue_tokens`` beside the queued tokens and ``reserved`` ones
        (requests let in but not yet submitted); an empty queue always has room, so a large request is slow rather
        than refused forever. The server asks this before parsing a body, with an estimate from its size."""
        with self._cond:
            queued = self._queued_tokens + reserved
            return queued == 0 or (queued < self.max_queue_tokens and queued + tokens <= self.max_queue_tokens)

    def queue_full(self) -> QueueFull:
        """The refusal for a request that found no room, its retry delay from the measured token rate."""
        with self._cond:
            return QueueFull(self._queued_tokens, self.max_queue_tokens, self._retry_after())

    def cancel(self, job: Job) -> None:
        """Drop the rows of ``job`` that no pool has taken (its client has gone); its future is never set."""
        with self._cond:
            if job.cancelled:
                return
            job.cancelled = True
            left = job.rows - job.next_row
            if left:
                self.metrics.cancelled_items.inc(left)
                self._drop({job})

    def close(self, timeout: float | None = None) -> None:
        """Refuse new jobs, finish the queued ones, stop the engine threads."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        for thread in self._threads:
            if thread.is_alive():
                thread.join(timeout)

    # -- the engine threads -----------------------------------------------------------------------------------------

    def _loop(self, engine: int) -> None:
        while (pool := self._next_pool()) is not None:
            self._run(engine, pool)

    def _next_pool(self) -> _Pool | None:
        with self._cond:
            self._idle += 1
            try:
                while not self._pending and not self._stopping:
                    self._cond.wait()
                if not self._pending:
                    return None
                deadline = self._pending[0].enqueued + self.max_wait
                while not self._stopping and not self._full() and self._more_coming():
                    left = deadline - self._clock()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                if not self._pending:  # every waiting job was cancelled meanwhile
                    return _Pool()
                return self._take()
            finally:
                self._idle -= 1

    def _full(self) -> bool:
        return self._queued_rows >= self.max_rows or self._queued_tokens >= self.max_batch_tokens

    def _more_coming(self) -> bool:
        return self._arriving > 0 or len(self._pending) < self._last_pool_jobs

    def _take(self) -> _Pool:
        """Rows for one pool: first come, first served, each job at most half a pool in the first pass. Where other
        engines wait too, the queued tokens are shared out among them (a 32-row request and 2 idle engines: about
        half its tokens each, so both halves finish together), so that one engine does not take everything while
        another idles."""
        limit = self.max_rows
        share = math.ceil(self._queued_tokens / self._idle) if self._idle > 1 else None
        spans: dict[Job, list[int]] = {}
        rows = tokens = 0
        for cap in (max(1, limit // 2), limit):
            for job in self._pending:
                if rows >= limit:
                    break
                span = spans.setdefault(job, [job.next_row, job.next_row])
                while span[1] < job.rows and span[1] - span[0] < cap and rows < limit:
                    length = int(job.lengths[span[1]])
                    if rows and tokens + length > self.max_batch_tokens:
                        break
                    if rows and share is not None and tokens + length / 2 > share:  # the row is nearer the next share
                        break
                    span[1] += 1
                    rows += 1
                    tokens += length
        pool = _Pool(rows=rows, tokens=tokens)
        now = self._clock()
        for job, (start, stop) in spans.items():
            if stop == start:
                continue
            job.next_row = stop
            pool.spans.append((job, start, stop))
            if not job.started:
                job.started = True
                self.metrics.queue_time.observe(now - job.enqueued)
        self._pending = deque(j for j in self._pending if j.next_row < j.rows)
        self._queued_rows -= rows
        self._queued_tokens -= tokens
        self._last_pool_jobs = len(pool.spans)
        self._publish_queue()
        self._room_made()
        if self._pending and self._idle > 1:  # the rest is for the other waiting engines: now, not at their deadline
            self._cond.notify_all()
        return pool

    def _run(self, engine: int, pool: _Pool) -> None:
        if not pool.rows:
            return
        parts = [job.encoded.take(slice(start, stop)) for job, start, stop in pool.spans]
        encoded = Encoded(
            ids=[ids for part in parts for ids in part.ids],
            instruction_count=np.concatenate([p.instruction_count for p in parts]),
            truncated=np.concatenate([p.truncated for p in parts]),
        )
        started = last = time.perf_counter()

        def on_batch(rows: int, _tokens: int) -> None:
            nonlocal last
            now = time.perf_counter()
            self.metrics.batch_size.observe(rows)
            self.metrics.inference.observe(now - last)
            last = now

        try:
            window = self.encoders[engine].encode_tokenized(encoded, self.max_rows, self.max_batch_tokens, on_batch=on_batch)
        except Exception as exc:  # an engine failure fails these requests, not the server
            self._fail({job for job, _, _ in pool.spans}, exc)
            return
        elapsed = time.perf_counter() - started
        rate = pool.tokens / max(elapsed, 1e-6)
        self._rates[engine] = rate if not self._rates[engine] else 0.8 * self._rates[engine] + 0.2 * rate
        self.metrics.items.inc(pool.rows)
        self.metrics.tokens.inc(pool.tokens)
        self.metrics.padded_tokens.inc(window.stats.padded_tokens)
        finished = []
        offset = 0
        with self._cond:  # another engine thread may be finishing other rows of the same jobs
            for job, start, stop in pool.spans:
                job.vectors[start:stop] = window.vectors[offset : offset + stop - start]
                offset += stop - start
                job.done += stop - start
                if job.done == job.rows and not job.cancelled:
                    finished.append(job)
        for job in finished:
            job.future.set_result(job.vectors)

    def _drop(self, jobs: set[Job]) -> None:
        """Remove the untaken rows of ``jobs`` from the queue (under the lock)."""
        for job in jobs:
            left = job.lengths[job.next_row :]
            self._queued_rows -= len(left)
            self._queued_tokens -= int(left.sum())
            job.next_row = job.rows
        self._pending = deque(j for j in self._pending if j not in jobs)
        self._publish_queue()
        self._room_made()

    def _fail(self, jobs: set[Job], exc: Exception) -> None:
        """Fail the jobs of a pool whose batch raised, and drop their rows that are still queued."""
        with self._cond:
            self._drop(jobs)
        for job in jobs:
            if not job.future.done() and not job.cancelled:
                job.future.set_exception(exc)

    def _retry_after(self) -> int:
        """Seconds until the queued tokens have run at the measured rate of all engines (1 to 60)."""
        rate = sum(self._rates)
        if rate <= 0:
            return 1
        return int(min(60, max(1, math.ceil(self._queued_tokens / rate))))

    def _publish_queue(self) -> None:
        self.metrics.queue_items.set(self._queued_rows)
        self.metrics.queue_tokens.set(self._queued_tokens)

    def _room_made(self) -> None:
        if self._on_room is not None:
            self._on_room()
