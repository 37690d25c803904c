"""runtime.Encoder on the tiny fixture's ONNX engine: golden vectors of InstructorEmbedding 1.0.1, batching, no torch."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from runtime.batching import BatchStats, aligned, padded_size, plan_batches, widen
from runtime.encoder import DEFAULT_MAX_PADDING, DEFAULT_MAX_TOKENS, DEFAULT_WINDOW, Encoder
from runtime.tokenization import InstructionTokenizer
from tests.conftest import TINY, assert_torch_free

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_CORPUS = ROOT / "runtime" / "data" / "sample_corpus.jsonl"


@pytest.fixture(scope="module")
def encoder(tiny_engine) -> Encoder:
    with Encoder(tiny_engine) as enc:
        yield enc


def mixed_length_texts(n: int, seed: int = 0) -> list:
    """Documents of 1 to 16 sample sentences (about 10 to 500 tokens), a third with an instruction."""
    docs = [json.loads(line)["text"] for line in SAMPLE_CORPUS.read_text(encoding="utf-8").splitlines()]
    rng = random.Random(seed)
    out: list = []
    for i in range(n):
        text = " ".join(rng.sample(docs, rng.choice([1, 1, 2, 3, 4, 8, 16])))
        out.append(["Represent the document for retrieval: ", text] if i % 3 == 0 else text)
    return out


@pytest.mark.parametrize("batch_size,max_tokens", [(32, DEFAULT_MAX_TOKENS), (1, DEFAULT_MAX_TOKENS), (7, 300), (64, 10**6)])
def test_golden_vectors_any_order_batch_and_budget(encoder, golden_inputs, golden_vectors, batch_size, max_tokens):
    order = list(range(len(golden_inputs)))
    random.Random(batch_size).shuffle(order)
    out = encoder.encode([golden_inputs[i] for i in order], batch_size=batch_size, max_tokens=max_tokens)
    restored = np.empty_like(out)
    restored[order] = out
    assert restored.dtype == np.float32 and restored.shape == golden_vectors.shape
    assert np.abs(restored - golden_vectors).max() <= 1e-5
    assert encoder.last_stats.rows == 64 and encoder.last_stats.truncated >= 1  # the >512-token golden input


@pytest.mark.parametrize("window", [1, 5, 64])
def test_golden_vectors_with_any_window(tiny_engine, golden_inputs, golden_vectors, window):
    with Encoder(tiny_engine, window=window, queue_size=1) as enc:
        out = enc.encode(golden_inputs, batch_size=8)
    assert np.abs(out - golden_vectors).max() <= 1e-5


def test_input_forms_single_and_mixed(encoder, golden_inputs, golden_vectors):
    plain = next(i for i, x in enumerate(golden_inputs) if isinstance(x, str))
    pair = next(i for i, x in enumerate(golden_inputs) if isinstance(x, list) and len(x) == 2)
    one = encoder.encode(golden_inputs[plain])
    assert one.shape == (32,) and np.abs(one - golden_vectors[plain]).max() <= 1e-5
    triple = [*golden_inputs[pair], 0]  # the third element is ignored, as upstream
    tup = tuple(golden_inputs[pair])
    out = encoder.encode([triple, golden_inputs[plain], tup])
    np.testing.assert_allclose(out, golden_vectors[[pair, plain, pair]], atol=1e-5, rtol=0)
    as_list = encoder.encode([golden_inputs[plain]], convert_to_numpy=False)
    assert isinstance(as_list, list) and as_list[0].shape == (32,)
    assert encoder.encode([]).shape == (0, 32)


def test_normalize_and_metadata(encoder, golden_inputs):
    out = encoder.encode(golden_inputs[:8], normalize_embeddings=True)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-6)
    assert encoder.embedding_dim == 32 and encoder.max_seq_length == 512
    assert isinstance(encoder.tokenizer, InstructionTokenizer)
    assert encoder.manifest.precision == "fp32" and encoder.device == "cpu"


def test_refusals_are_clear(encoder):
    with pytest.raises(ValueError, match="no torch"):
        encoder.encode(["x"], convert_to_tensor=True)
    with pytest.raises(ValueError, match="sentence embeddings only"):
        encoder.encode(["x"], output_value="token_embeddings")
    with pytest.raises(ValueError, match="runs on cpu"):
        encoder.encode(["x"], device="cuda")
    with pytest.raises(TypeError, match="input 1"):
        encoder.encode(["fine", 42])
    with pytest.raises(ValueError, match="input 0"):
        encoder.encode([["only instruction"]])


def test_stream_keeps_order_and_memory_bound(encoder, golden_inputs, golden_vectors):
    """A generator of any length goes through in windows, each in input order; items come back with vectors."""
    produced = []

    def items():
        for i in range(3 * len(golden_inputs)):
            produced.append(i)
            yield i

    encoder_window, encoder.window = encoder.window, 50
    try:
        windows = []
        for win in encoder.stream(items(), batch_size=16, to_input=lambda i: golden_inputs[i % 64]):
            windows.append(win)
            # the producer runs at most queue_size + 1 windows ahead of the consumer
            assert len(produced) <= sum(len(w.items) for w in windows) + (encoder.queue_size + 1) * 50
    finally:
        encoder.window = encoder_window
    assert [len(w.items) for w in windows] == [50, 50, 50, 42]
    flat = [i for w in windows for i in w.items]
    assert flat == list(range(192))
    vectors = np.concatenate([w.vectors for w in windows])
    assert np.abs(vectors - np.tile(golden_vectors, (3, 1))).max() <= 1e-5


def test_stream_surfaces_reader_errors(encoder):
    def broken():
        yield "fine"
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        list(encoder.stream(broken()))


def test_plan_batches_invariants():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 513, size=3000)
    for max_rows, max_tokens, max_padding in [(32, 16384, 0.05), (1, 10, 0.0), (64, 1000, 0.2), (500, 10**9, 0.5)]:
        batches = plan_batches(lengths, max_rows, max_tokens, max_padding)
        rows = np.concatenate(batches)
        assert sorted(rows.tolist()) == list(range(3000))  # every row exactly once
        for b in batches:
            width = lengths[b].max()
            assert len(b) <= max_rows
            assert len(b) == 1 or len(b) * width <= max_tokens
            assert 1 - lengths[b].sum() / (len(b) * width) <= max_padding + 1e-12
    assert plan_batches(np.array([], dtype=np.int64), 32, 100) == []
    with pytest.raises(ValueError):
        plan_batches(lengths, 0, 100)


def test_aligned_widths_round_up_to_the_multiple_but_not_past_the_cap():
    lengths = np.array([1, 15, 16, 17, 250, 255, 256, 300])
    assert aligned(lengths, 1, 256).tolist() == lengths.tolist()
    assert aligned(lengths, 16, 256).tolist() == [16, 16, 16, 32, 256, 256, 256, 300]  # a longer row keeps its length
    assert aligned(lengths, 16, 250).tolist() == [16, 16, 16, 32, 250, 255, 256, 300]
    feeds = {"input_ids": np.array([[5, 6, 7], [5, 6, 0]]), "attention_mask": np.array([[1, 1, 1], [1, 1, 0]]),
             "instruction_count": np.array([1, 0])}
    wide = widen(feeds, 4, 512, pad_id=0)
    assert wide["input_ids"].tolist() == [[5, 6, 7, 0], [5, 6, 0, 0]] and wide["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 0, 0]]
    assert wide["instruction_count"] is feeds["instruction_count"] and widen(feeds, 1, 512, 0) is feeds


def test_an_engine_with_a_length_multiple_gets_aligned_batches_and_the_same_vectors(tiny_engine, golden_inputs):
    """What the encoder pads to for an engine whose race found widths in multiples of 16 faster: every batch at a
    multiple of 16 (or max_seq_length), counted as computed, with the vectors of unaligned batches."""
    with Encoder(tiny_engine) as enc:
        assert enc.length_multiple == enc.engine_choice.length_multiple == 1  # one engine, not raced: the longest row
        enc.max_seq_length = 100
        plain = enc.encode(golden_inputs, batch_size=8)
    with Encoder(tiny_engine, length_multiple=16) as enc:
        enc.max_seq_length = 100  # not a multiple of 16: the cap of the rounding
        shapes: list[tuple[int, int]] = []
        run = enc.backend.run
        enc.backend.run = lambda feeds: shapes.append(feeds["input_ids"].shape) or run(feeds)
        out = enc.encode(golden_inputs, batch_size=8)
        stats = enc.last_stats
    widths = [w for _, w in shapes]
    assert all(w % 16 == 0 or w == 100 for w in widths) and 100 in widths and any(w < 100 for w in widths)
    assert stats.padded_tokens == sum(n * w for n, w in shapes)
    assert np.abs(out - plain).max() <= 1e-6
    with pytest.raises(ValueError, match="length_multiple"):
        Encoder(tiny_engine, length_multiple=0)


def test_padding_waste_under_10_percent_on_mixed_lengths():
    """Tokenized mixed-length sample (10-500 tokens), batched with the Encoder's defaults."""
    tok = InstructionTokenizer.from_checkpoint(TINY)
    lengths = tok.encode(mixed_length_texts(3000)).lengths
    assert lengths.min() < 40 and lengths.max() >= 400  # really mixed
    for start in range(0, len(lengths), DEFAULT_WINDOW):
        window = lengths[start : start + DEFAULT_WINDOW]
        batches = plan_batches(window, 32, DEFAULT_MAX_TOKENS, DEFAULT_MAX_PADDING)
        waste = 1 - window.sum() / padded_size(window, batches)
        assert waste < 0.10
    # for contrast: fixed batches of 32 in input order (no sorting) pad a third or more
    naive = [np.arange(i, min(i + 32, len(lengths))) for i in range(0, len(lengths), 32)]
    assert 1 - lengths.sum() / padded_size(lengths, naive) > 0.3


def test_encoder_reports_padding_waste(encoder):
    encoder.encode(mixed_length_texts(300, seed=1), batch_size=32)
    stats = encoder.last_stats
    assert stats.rows == 300 and stats.tokens > 0 and stats.padded_tokens >= stats.tokens
    assert stats.padding_waste < 0.10
    assert set(stats.as_dict()) >= {"rows", "tokens", "padded_tokens", "truncated", "batches", "padding_waste"}
    assert (BatchStats(rows=1, tokens=3, padded_tokens=4) + BatchStats(rows=2, tokens=1, padded_tokens=4)).padding_waste == 0.5


def test_runtime_never_imports_torch(tiny_engine, tmp_path):
    """Import the runtime, encode, and run the CLI in a fresh interpreter: torch, trainer, export stay out."""
    (tmp_path / "docs.txt").write_text("one document\nanother one\n", encoding="utf-8")
    code = f"""
import sys
import runtime
from runtime import Encoder
v = Encoder({str(tiny_engine)!r}).encode(["hello", ["Represent: ", "world"]])
assert v.shape == (2, 32)
from runtime import encode
rc = encode.main(["--engine", {str(tiny_engine)!r}, "--input", {str(tmp_path / "docs.txt")!r},
                  "--output", {str(tmp_path / "out.npy")!r}, "--quiet"])
assert rc == 0, rc
"""
    assert_torch_free(code)
