"""The server's batcher on the tiny engine: exact vectors whatever the grouping, fairness, waiting, backpressure, drain.

Every order these tests assert is built, never waited for: engines that hold each pool at a gate until the test lets
it through (``GatedEncoder``), a clock that moves only when the test advances it (``FakeClock``), and waits on a
state (``wait_until``) whose timeout only names a state that never came. Which of two idle engine threads wakes first
is the scheduler's choice; the tests find out which one did and assert what each took.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

pytest.importorskip("prometheus_client")

from runtime import Encoder  # noqa: E402
from runtime.serve.batcher import Batcher, QueueFull, ShuttingDown  # noqa: E402
from runtime.serve.metrics import Metrics  # noqa: E402
from tests.serve_support import FakeClock, GatedEncoder, wait_until  # noqa: E402

SAFETY = 120  # seconds: a result that never comes fails the test; no outcome depends on it


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
    wait_until(lambda: b._idle == engines, f"{engines} idle engine threads")


def poke(b: Batcher) -> None:
    """Wake the engine threads so that they look at the (fake) clock again."""
    with b._cond:
        b._cond.notify_all()


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
        return idx, b.submit(enc).future.result(timeout=SAFETY)

    try:
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(one, slices))
    finally:
        b.close()
    for idx, vectors in results:
        np.testing.assert_allclose(vectors, golden_vectors[idx], atol=1e-5)


def test_small_request_is_not_starved_by_a_large_one(gated, encoder):
    """A 1-item request that arrives while a 1000-item one runs is in the very next pool, not after all 1000 rows:
    with only two pools let through, the small request is answered and the large one is not."""
    b = make(gated, max_batch_size=32, max_wait_ms=0)
    gated.gate.clear()
    big = b.submit(encoder.tokenizer.encode([f"document number {i}" for i in range(1000)]))
    assert gated.entered.wait(SAFETY)
    small = b.submit(encoder.tokenizer.encode(["a short query"]))
    gated.gate.allow(2)  # the pool of 32 big rows that is waiting, and the next one
    small.future.result(timeout=SAFETY)
    wait_until(lambda: len(gated.pools) == 3, "the third pool at the gate")
    assert not big.future.done(), "the small request waited for the whole large one"
    gated.gate.set()
    big_vectors = big.future.result(timeout=SAFETY)
    b.close()
    assert gated.pools[0] == 32 and gated.pools[1] == 32  # the second pool held 31 big rows and the small one
    assert len(gated.pools) == 32  # 1001 rows in pools of 32
    np.testing.assert_allclose(big_vectors[:3], encoder.encode(["document number 0", "document number 1", "document number 2"]), atol=1e-5)


def test_lone_request_waits_at_most_max_wait(encoder):
    """With another request announced but never arriving, a queued one waits, and runs once max_wait_ms has passed
    on the batcher's clock; a request that no one else is announced beside runs at once."""
    clock = FakeClock()
    b = Batcher([encoder], Metrics(), max_wait_ms=150, clock=clock)
    b.start()
    enc = encoder.tokenizer.encode(["alone"])
    b.submit(enc).future.result(timeout=SAFETY)  # no one else announced: runs without the clock moving
    with b.arriving():
        job = b.submit(enc)
        reads = clock.reads
        wait_until(lambda: clock.reads > reads + 1, "the engine thread waiting on the clock")
        assert not job.future.done()  # waiting for the announced request, with 150 ms not yet passed
        clock.advance(0.149)
        poke(b)
        wait_until(lambda: clock.reads > reads + 3, "the engine thread looking at the clock again")
        assert not job.future.done()
        clock.advance(0.002)  # past max_wait_ms after the job arrived: it runs, the announced request still missing
        poke(b)
        job.future.result(timeout=SAFETY)
    b.close()
    b2 = Batcher([encoder], Metrics(), max_wait_ms=3_600_000, clock=FakeClock())
    b2.start()
    with b2.arriving() as arrival:  # the announced request is this one: once submitted, nothing else is coming
        b2.submit(enc, arrival).future.result(timeout=SAFETY)  # the clock never moves: it did not wait an hour
    b2.close()


def test_queue_full_then_drain_on_close(gated, encoder):
    b = make(gated, max_queue_tokens=8, max_wait_ms=0)
    gated.gate.clear()
    first = b.submit(encoder.tokenizer.encode(["running now"]))
    assert gated.entered.wait(SAFETY)
    second = b.submit(encoder.tokenizer.encode(["queued: the queue was empty, so it is taken whatever its size " * 3]))
    with pytest.raises(QueueFull) as info:
        b.submit(encoder.tokenizer.encode(["one more"]))
    assert info.value.retry_after >= 1
    closer = threading.Thread(target=b.close)
    closer.start()  # shutting down with two requests accepted ...
    wait_until(lambda: b._stopping, "the batcher shutting down")
    with pytest.raises(ShuttingDown):
        b.submit(encoder.tokenizer.encode(["too late"]))
    gated.gate.set()
    closer.join(SAFETY)
    assert first.future.result(timeout=SAFETY).shape == (1, 32)  # ... answers both
    assert second.future.result(timeout=SAFETY).shape == (1, 32)
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
    assert gated.entered.wait(SAFETY) and made.wait(SAFETY)  # its rows left the queue for the engine
    made.clear()
    second = b.submit(encoder.tokenizer.encode(["queued"]))
    queued = int(second.lengths.sum())
    assert b.room_for(8 - queued) and not b.room_for(9 - queued) and not b.room_for(8 - queued, reserved=1)
    third = b.submit(encoder.tokenizer.encode(["let in past the limit " * 3]), let_in=True)
    assert not made.is_set() and b.queue_full().retry_after >= 1
    gated.gate.set()
    for job in (first, second, third):
        assert job.future.result(timeout=SAFETY).shape == (1, 32)
    assert made.wait(SAFETY)
    b.close()


def test_engine_failure_fails_its_requests_only(gated, encoder):
    b = make(gated, max_wait_ms=0)
    gated.fail_next = "engine exploded"
    bad = b.submit(encoder.tokenizer.encode(["first"]))
    with pytest.raises(RuntimeError, match="engine exploded"):
        bad.future.result(timeout=SAFETY)
    good = b.submit(encoder.tokenizer.encode(["second"])).future.result(timeout=SAFETY)
    b.close()
    np.testing.assert_allclose(good, encoder.encode(["second"]), atol=1e-5)


def test_cancelled_job_is_not_computed(gated, encoder):
    """A job cancelled while it waits (its client went away) never reaches the engine; the others are answered."""
    metrics = Metrics()
    b = Batcher([gated], metrics, max_batch_size=4, max_wait_ms=0)
    b.start()
    gated.gate.clear()
    running = b.submit(encoder.tokenizer.encode(["running now"]))
    assert gated.entered.wait(SAFETY)
    gone = b.submit(encoder.tokenizer.encode([f"abandoned {i}" for i in range(10)]))
    kept = b.submit(encoder.tokenizer.encode(["still wanted"]))
    b.cancel(gone)
    b.cancel(gone)  # twice is harmless
    gated.gate.set()
    np.testing.assert_allclose(kept.future.result(timeout=SAFETY), encoder.encode(["still wanted"]), atol=1e-5)
    running.future.result(timeout=SAFETY)
    b.close()
    assert not gone.future.done()
    assert gated.pools == [1, 1]  # the running job, then the kept one: none of the 10 abandoned rows
    assert metrics.cancelled_items._value.get() == 10


def _first_and_second(engines: list[GatedEncoder], encoded) -> tuple[GatedEncoder, GatedEncoder]:
    """Of two engines that each took a pool of one job, the one whose pool holds the job's first row took first."""
    first = [e for e in engines if e.pool_ids and e.pool_ids[0][0] == list(encoded.ids[0])]
    assert len(first) == 1, "exactly one engine holds the job's first row"
    return first[0], next(e for e in engines if e is not first[0])


def test_several_engines_behind_one_batcher(encoder, tiny_engine, golden_inputs, golden_vectors):
    """Two engines (--replicas 2) share the queue: both idle, the first job is shared out between them; while one
    engine is held, the other runs every later job alone; every row is still the reference's vector."""
    other = Encoder(tiny_engine, intra_op_threads=1)
    engines = [GatedEncoder(encoder), GatedEncoder(other)]
    for e in engines:
        e.gate.clear()  # neither pool finishes before both are taken
    b = make(engines, max_batch_size=4, max_wait_ms=0)
    wait_idle(b, 2)
    encoded = encoder.tokenizer.encode(golden_inputs[:4])
    held = b.submit(encoded)
    wait_until(lambda: all(e.pools for e in engines), "both engines holding a pool")
    took_first, took_second = _first_and_second(engines, encoded)
    k = took_first.pools[0]
    assert 1 <= k < 4 and took_second.pools[0] == 4 - k  # shared out: the first rows to one, the rest to the other
    assert took_second.pool_ids[0] == [list(r) for r in encoded.ids[k:]]
    took_first.gate.set()  # the other engine stays held: the first must take the next jobs alone
    rest = [b.submit(encoder.tokenizer.encode(golden_inputs[i : i + 4])) for i in range(4, 16, 4)]
    done = [job.future.result(timeout=SAFETY) for job in rest]
    assert took_first.pools == [k, 4, 4, 4] and took_second.pools == [4 - k]
    took_second.gate.set()
    np.testing.assert_allclose(held.future.result(timeout=SAFETY), golden_vectors[:4], atol=1e-5)
    b.close()
    other.close()
    np.testing.assert_allclose(np.concatenate(done), golden_vectors[4:16], atol=1e-5)


def test_idle_engines_share_the_queue(encoder, tiny_engine, golden_inputs, golden_vectors):
    """16 rows waiting and two idle engines: about half the tokens each (one engine taking all 16 would leave the
    other idle, as with 16 closed-loop clients of one item; half the rows each would leave the engine with the
    shorter half idle); both pools run at once, and the rows are the reference's vectors."""
    other = Encoder(tiny_engine, intra_op_threads=1)
    engines = [GatedEncoder(encoder), GatedEncoder(other)]
    for e in engines:
        e.gate.clear()  # neither pool finishes before both are taken
    b = make(engines, max_batch_size=16, max_wait_ms=0)
    wait_idle(b, 2)
    encoded = encoder.tokenizer.encode(golden_inputs[:16])
    job = b.submit(encoded)
    wait_until(lambda: all(e.pools for e in engines), "both engines holding a pool")
    took_first, took_second = _first_and_second(engines, encoded)
    for e in engines:
        e.gate.set()
    np.testing.assert_allclose(job.future.result(timeout=SAFETY), golden_vectors[:16], atol=1e-5)
    b.close()
    other.close()
    lengths = [len(ids) for ids in encoded.ids]
    k = took_first.pools[0]
    assert k + took_second.pools[0] == 16 and len(took_first.pools) == len(took_second.pools) == 1
    assert took_first.pool_tokens[0] == sum(lengths[:k])  # first come, first served: the first rows
    assert abs(took_first.pool_tokens[0] - took_second.pool_tokens[0]) <= max(lengths)
    assert abs(took_first.pool_tokens[0] - took_second.pool_tokens[0]) < abs(sum(lengths[:8]) - sum(lengths[8:]))
