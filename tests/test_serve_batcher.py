"""The server's batcher on the tiny engine: exact vectors whatever the grouping, fairness, waiting, backpressure, drain."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

pytest.importorskip("prometheus_client")

from runtime import Encoder  # noqa: E402
from runtime.serve.batcher import Batcher, QueueFull, ShuttingDown  # noqa: E402
from runtime.serve.metrics import Metrics  # noqa: E402
from tests.serve_support import GatedEncoder  # noqa: E402


@pytest.fixture(scope="module")
def encoder(tiny_engine):
    enc = Encoder(tiny_engine)
    yield enc
    enc.close()


@pytest.fixture
def gated(encoder):
    return GatedEncoder(encoder)


def make(enc, **kw) -> Batcher:
    b = Batcher(enc if isinstance(enc, list) else [enc], Metrics(), **kw)
    b.start()
    return b


def wait_idle(b: Batcher, engines: int) -> None:
    """Until ``engines`` engine threads wait for work (just after ``start`` they may not have reached the queue)."""
    deadline = time.monotonic() + 10
    while b._idle < engines and time.monotonic() < deadline:
        time.sleep(0.01)
    assert b._idle == engines


def test_vectors_equal_golden_under_concurrency(encoder, golden_inputs, golden_vectors):
    """Requests of 1..17 mixed items from 8 threads: every row equals InstructorEmbedding 1.0.1's vector."""
    b = make(encoder, max_batch_size=8, max_wait_ms=2)
    rng = np.random.default_rng(0)
    slices = []
    for _ in range(40):
        idx = rng.choice(len(golden_inputs), size=int(rng.integers(1, 18)), replace=False)
        slices.append(idx)

    def one(idx):
        enc = encoder.tokenizer.encode([golden_inputs[i] for i in idx])
        return idx, b.submit(enc).future.result(timeout=60)

    try:
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(one, slices))
    finally:
        b.close()
    for idx, vectors in results:
        np.testing.assert_allclose(vectors, golden_vectors[idx], atol=1e-5)


def test_small_request_is_not_starved_by_a_large_one(gated, encoder):
    """A 1-item request that arrives while a 1000-item one runs is in the very next pool, not after all 1000 rows."""
    b = make(gated, max_batch_size=32, max_wait_ms=0)
    gated.gate.clear()
    big = b.submit(encoder.tokenizer.encode([f"document number {i}" for i in range(1000)]))
    assert gated.entered.wait(10)
    small = b.submit(encoder.tokenizer.encode(["a short query"]))
    gated.gate.set()
    small.future.result(timeout=30)
    assert not big.future.done(), "the small request waited for the whole large one"
    big_vectors = big.future.result(timeout=60)
    b.close()
    assert gated.pools[0] == 32 and gated.pools[1] == 32  # the second pool held 31 big rows and the small one
    assert len(gated.pools) == 32  # 1001 rows in pools of 32
    np.testing.assert_allclose(big_vectors[:3], encoder.encode(["document number 0", "document number 1", "document number 2"]), atol=1e-5)


def test_lone_request_waits_at_most_max_wait(encoder):
    """With another request announced but never arriving, a queued one still runs once max_wait_ms has passed."""
    b = make(encoder, max_wait_ms=150)
    enc = encoder.tokenizer.encode(["alone"])
    b.submit(enc).future.result(timeout=10)  # no one else announced: runs at once
    with b.arriving():
        t0 = time.monotonic()
        b.submit(enc).future.result(timeout=10)
        waited = time.monotonic() - t0
    b.close()
    assert waited >= 0.14  # it waited for the announced request ...
    assert waited < 5  # ... but not for ever
    b2 = make(encoder, max_wait_ms=3000)
    with b2.arriving() as arrival:  # the announced request is this one: once submitted, nothing else is coming
        t0 = time.monotonic()
        b2.submit(enc, arrival).future.result(timeout=10)
        counted_out = time.monotonic() - t0
    b2.close()
    assert counted_out < 2.5  # submitting with its Arrival ends the wait for it (else 3 s)


def test_queue_full_then_drain_on_close(gated, encoder):
    b = make(gated, max_queue_tokens=8, max_wait_ms=0)
    gated.gate.clear()
    first = b.submit(encoder.tokenizer.encode(["running now"]))
    assert gated.entered.wait(10)
    second = b.submit(encoder.tokenizer.encode(["queued: the queue was empty, so it is taken whatever its size " * 3]))
    with pytest.raises(QueueFull) as info:
        b.submit(encoder.tokenizer.encode(["one more"]))
    assert info.value.retry_after >= 1
    closer = threading.Thread(target=b.close)
    closer.start()  # shutting down with two requests accepted ...
    time.sleep(0.05)
    with pytest.raises(ShuttingDown):
        b.submit(encoder.tokenizer.encode(["too late"]))
    gated.gate.set()
    closer.join(30)
    assert first.future.result(timeout=1).shape == (1, 32)  # ... answers both
    assert second.future.result(timeout=1).shape == (1, 32)
    assert not b.alive


def test_room_for_counts_reserved_tokens_and_on_room_fires_when_tokens_leave(gated, encoder):
    """room_for: an empty queue always has room; queued plus reserved tokens count against max_queue_tokens.
    on_room is called when a pool takes rows out of the queue; let_in skips the limit (the caller applied it)."""
    made = threading.Event()
    gated.gate.clear()
    b = Batcher([gated], Metrics(), max_queue_tokens=8, max_wait_ms=0, on_room=made.set)
    b.start()
    assert b.room_for(10_000) and not b.room_for(10_000, reserved=1) and b.room_for(8, reserved=0)
    first = b.submit(encoder.tokenizer.encode(["running now"]))
    assert gated.entered.wait(10) and made.wait(10)  # its rows left the queue for the engine
    made.clear()
    second = b.submit(encoder.tokenizer.encode(["queued"]))
    queued = int(second.lengths.sum())
    assert b.room_for(8 - queued) and not b.room_for(9 - queued) and not b.room_for(8 - queued, reserved=1)
    third = b.submit(encoder.tokenizer.encode(["let in past the limit " * 3]), let_in=True)
    assert not made.is_set() and b.queue_full().retry_after >= 1
    gated.gate.set()
    for job in (first, second, third):
        assert job.future.result(timeout=30).shape == (1, 32)
    assert made.wait(10)
    b.close()


def test_engine_failure_fails_its_requests_only(gated, encoder):
    b = make(gated, max_wait_ms=0)
    gated.fail_next = "engine exploded"
    bad = b.submit(encoder.tokenizer.encode(["first"]))
    with pytest.raises(RuntimeError, match="engine exploded"):
        bad.future.result(timeout=10)
    good = b.submit(encoder.tokenizer.encode(["second"])).future.result(timeout=10)
    b.close()
    np.testing.assert_allclose(good, encoder.encode(["second"]), atol=1e-5)


def test_cancelled_job_is_not_computed(gated, encoder):
    """A job cancelled while it waits (its client went away) never reaches the engine; the others are answered."""
    metrics = Metrics()
    b = Batcher([gated], metrics, max_batch_size=4, max_wait_ms=0)
    b.start()
    gated.gate.clear()
    running = b.submit(encoder.tokenizer.encode(["running now"]))
    assert gated.entered.wait(10)
    gone = b.submit(encoder.tokenizer.encode([f"abandoned {i}" for i in range(10)]))
    kept = b.submit(encoder.tokenizer.encode(["still wanted"]))
    b.cancel(gone)
    b.cancel(gone)  # twice is harmless
    gated.gate.set()
    np.testing.assert_allclose(kept.future.result(timeout=10), encoder.encode(["still wanted"]), atol=1e-5)
    running.future.result(timeout=10)
    b.close()
    assert not gone.future.done()
    assert gated.pools == [1, 1]  # the running job, then the kept one: none of the 10 abandoned rows
    assert metrics.cancelled_items._value.get() == 10


def test_several_engines_behind_one_batcher(encoder, tiny_engine, golden_inputs, golden_vectors):
    """Two engines (--replicas 2) share the queue: both run pools, and every row is still the reference's vector."""
    other = Encoder(tiny_engine, intra_op_threads=1)
    first, second = GatedEncoder(encoder), GatedEncoder(other)
    b = make([first, second], max_batch_size=4, max_wait_ms=0)
    wait_idle(b, 2)
    first.gate.clear()  # the first engine holds its half of the first job, so the second must take the next ones
    held = b.submit(encoder.tokenizer.encode(golden_inputs[:4]))
    assert first.entered.wait(10)
    rest = [b.submit(encoder.tokenizer.encode(golden_inputs[i : i + 4])) for i in range(4, 16, 4)]
    done = [job.future.result(timeout=30) for job in rest]
    first.gate.set()
    np.testing.assert_allclose(held.future.result(timeout=30), golden_vectors[:4], atol=1e-5)
    b.close()
    other.close()
    np.testing.assert_allclose(np.concatenate(done), golden_vectors[4:16], atol=1e-5)
    assert first.pools == [2] and second.pools == [2, 4, 4, 4]  # the first job shared out between the idle engines


def test_idle_engines_share_the_queue(encoder, tiny_engine, golden_inputs, golden_vectors):
    """16 rows waiting and two idle engines: about half the tokens each (one engine taking all 16 would leave the
    other idle, as with 16 closed-loop clients of one item; half the rows each would leave the engine with the
    shorter half idle); both pools run at once, and the rows are the reference's vectors."""
    other = Encoder(tiny_engine, intra_op_threads=1)
    first, second = GatedEncoder(encoder), GatedEncoder(other)
    first.gate.clear()
    second.gate.clear()  # neither pool finishes before both are taken
    b = make([first, second], max_batch_size=16, max_wait_ms=0)
    wait_idle(b, 2)
    encoded = encoder.tokenizer.encode(golden_inputs[:16])
    job = b.submit(encoded)
    assert first.entered.wait(10) and second.entered.wait(10)
    first.gate.set()
    second.gate.set()
    np.testing.assert_allclose(job.future.result(timeout=30), golden_vectors[:16], atol=1e-5)
    b.close()
    other.close()
    lengths = [len(ids) for ids in encoded.ids]
    assert first.pools[0] + second.pools[0] == 16 and len(first.pools) == len(second.pools) == 1
    assert first.pool_tokens[0] == sum(lengths[: first.pools[0]])  # first come, first served: the first rows
    assert abs(first.pool_tokens[0] - second.pool_tokens[0]) <= max(lengths)
    assert abs(first.pool_tokens[0] - second.pool_tokens[0]) < abs(sum(lengths[:8]) - sum(lengths[8:]))
