"""Long documents (``long_text="chunk"``) and compact vectors (``output_dtype``) in the runtime and the CLI."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from runtime import chunking, encode
from runtime.encoder import Encoder
from runtime.job import summary_path
from runtime.output_dtype import OUTPUT_DTYPES, calibration_ranges, quantize, ranges_path
from tests.test_runtime import ROOT, mixed_length_texts

WINDOW = 64  # a copy of the tiny bundle with a 64-token window: long texts stay cheap (T5: relative positions)
INSTR = "Represent the document for retrieval: "


@pytest.fixture(scope="module")
def short_engine(tiny_engine_64) -> Path:
    return tiny_engine_64  # exported with the window: an edited manifest is refused at load


@pytest.fixture(scope="module")
def docs() -> list:
    return mixed_length_texts(40, seed=5)  # 10 to 500 tokens: most rows pass the 64-token window


def test_rows_that_fit_give_exactly_the_truncate_result(tiny_engine, golden_inputs):
    with Encoder(tiny_engine) as plain, Encoder(tiny_engine, long_text="chunk") as chunked:
        fits = [x for x, t in zip(golden_inputs, plain.tokenizer.encode(golden_inputs).truncated) if not t]
        assert len(fits) == 61  # three golden inputs pass 512 tokens
        np.testing.assert_array_equal(chunked.encode(fits), plain.encode(fits))
        assert chunked.last_stats.split_rows == 0 and chunked.last_stats.chunks == 61


@pytest.mark.parametrize("overlap", [0, 5, 32])
def test_chunk_spans_cover_every_token_with_the_overlap_asked(short_engine, docs, overlap):
    with Encoder(short_engine) as enc:
        tok = enc.tokenizer
    full = tok.encode(docs, truncate=False)
    head, tail = tok.special_tokens
    assert (head, tail) == ([], [1])  # T5: no leading special token, </s> after
    chunks = chunking.split(full, WINDOW, overlap, len(head), len(tail))
    for r, ids in enumerate(full.ids):
        mine = np.flatnonzero(chunks.row == r)
        assert chunks.index[mine].tolist() == list(range(len(mine)))
        if len(ids) <= WINDOW:
            assert len(mine) == 1 and chunks.encoded.ids[mine[0]] == ids
            continue
        prefix, end = int(full.instruction_count[r]), len(ids) - len(tail)
        spans = chunks.span[mine]
        assert spans[0, 0] == prefix and spans[-1, 1] == end  # first and last content token covered
        assert (spans[1:, 0] - spans[:-1, 1] == -overlap)[:-1].all()  # neighbours share exactly `overlap` tokens
        assert (spans[1:, 0] <= spans[:-1, 1] - overlap).all()  # the last window is pulled back, never a gap
        for k, (start, stop) in zip(mine, spans):
            piece = chunks.encoded.ids[k]
            assert len(piece) <= WINDOW and piece == ids[:prefix] + ids[start:stop] + ids[end:]
            assert chunks.encoded.instruction_count[k] == prefix and chunks.weight[k] == len(piece) - prefix


@pytest.mark.parametrize("pooling", ["mean", "max"])
def test_chunk_rule_equals_a_direct_computation(short_engine, docs, tiny_model, pooling):
    """The engine's chunked vector against PyTorch run on each chunk by hand, then the documented rule."""
    with Encoder(short_engine, long_text="chunk", chunk_overlap=8, chunk_pooling=pooling) as enc:
        got = enc.encode(docs, batch_size=7)
        full = enc.tokenizer.encode(docs, truncate=False)
    for r, ids in enumerate(full.ids):
        if len(ids) <= WINDOW:
            continue
        n, end = int(full.instruction_count[r]), len(ids) - 1
        width = WINDOW - n - 1
        starts = list(range(n, n + max(end - n - width, 0), width - 8)) + [n + max(end - n - width, 0)]
        vectors, weights = [], []
        for s in starts:
            piece = ids[:n] + ids[s : min(s + width, end)] + ids[end:]
            with torch.no_grad():
                v = tiny_model(torch.tensor([piece]), torch.ones(1, len(piece), dtype=torch.int64), torch.tensor([n]))
            vectors.append(v[0].double().numpy())
            weights.append(len(piece) - n)
        v = np.stack(vectors)
        row = (v * np.array(weights)[:, None]).sum(0) / sum(weights) if pooling == "mean" else v.max(0)
        np.testing.assert_allclose(got[r], row / np.linalg.norm(row), atol=1e-5, rtol=0)


def test_encode_chunks_gives_every_chunk_with_its_row_and_span(short_engine, docs):
    with Encoder(short_engine, long_text="chunk") as enc:
        out = enc.encode_chunks(docs, batch_size=5)
        rows = enc.encode(docs, batch_size=5)  # the same batches: the same bits
    assert out.vectors.shape == (len(out.row), 32) and sorted(set(out.row.tolist())) == list(range(len(docs)))
    for r in range(len(docs)):
        mine = out.row == r
        if mine.sum() == 1:
            np.testing.assert_array_equal(out.vectors[mine][0], rows[r])
    with Encoder(short_engine) as plain, pytest.raises(ValueError, match='long_text="chunk"'):
        plain.encode_chunks(docs)


def test_chunking_refuses_an_instruction_that_leaves_no_room(short_engine):
    long_instruction = "Represent " + "very " * 70 + "carefully: "
    with Encoder(short_engine, long_text="chunk") as enc, pytest.raises(ValueError, match="leaves windows of"):
        enc.encode([[long_instruction, "word " * 100]])


# -- output dtypes ---------------------------------------------------------------------------------------------------


def _reference_quantize(vectors, precision, ranges):
    try:
        from sentence_transformers.util import quantize_embeddings
    except ImportError:  # the documented rule, directly
        if precision == "float16":
            return vectors.astype(np.float16)
        if precision.endswith("binary"):
            bits = np.packbits(vectors > 0, axis=-1)
            return bits if precision == "ubinary" else (bits.astype(np.int16) - 128).astype(np.int8)
        steps = np.where(ranges[1] == ranges[0], 1, (ranges[1] - ranges[0]) / np.float32(255))
        q = np.clip(np.floor((vectors - ranges[0]) / steps), 0, 255)
        return q.astype(np.uint8) if precision == "uint8" else (q - 128).astype(np.int8)
    if precision == "float16":
        return vectors.astype(np.float16)
    return quantize_embeddings(vectors, precision=precision, ranges=ranges)


@pytest.mark.parametrize("precision", OUTPUT_DTYPES)
def test_output_dtypes_equal_sentence_transformers(tiny_engine, golden_inputs, precision):
    with Encoder(tiny_engine) as enc:
        vectors = enc.encode(golden_inputs)
        calibration = vectors[:40]
        ranges = calibration_ranges(calibration)
        ours = enc.encode(golden_inputs, output_dtype=precision, ranges=ranges if precision.endswith("int8") else None)
    expected = _reference_quantize(vectors, precision, ranges)
    assert ours.dtype == expected.dtype and ours.shape == expected.shape
    np.testing.assert_array_equal(ours, expected)
    if precision.endswith("binary"):
        assert ours.shape == (64, 4)  # 32 dims, 8 per byte


def test_int8_without_ranges_takes_them_from_the_vectors(tiny_engine, golden_inputs):
    with Encoder(tiny_engine) as enc:
        vectors = enc.encode(golden_inputs)
        np.testing.assert_array_equal(enc.encode(golden_inputs, output_dtype="uint8"),
                                      quantize(vectors, "uint8", calibration_ranges(vectors)))
        with pytest.raises(ValueError, match="output dtype must be one of"):
            enc.encode(golden_inputs, output_dtype="int4")


# -- the CLI -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, docs) -> Path:
    path = tmp_path_factory.mktemp("long") / "docs.jsonl"
    rows = [{"id": f"d{i}", "text": d if isinstance(d, str) else d[1]} for i, d in enumerate(docs)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _args(engine, src, out, *extra):
    return ["--engine", str(engine), "--input", str(src), "--output", str(out), "--instruction", INSTR,
            "--shard-rows", "8", "--quiet", *extra]


@pytest.mark.parametrize("output,extra", [
    ("o.npy", ["--long-text", "chunk", "--output-dtype", "int8"]),
    ("o.parquet", ["--long-text", "chunk", "--chunk-output", "all", "--id-field", "id", "--output-dtype", "binary"]),
    ("o.parquet", ["--long-text", "chunk", "--chunk-pooling", "max", "--output-dtype", "float16"]),
])
def test_a_resumed_run_with_these_options_is_byte_identical(short_engine, corpus, tmp_path, output, extra):
    ref = tmp_path / f"ref-{output}"
    assert encode.main(_args(short_engine, corpus, ref, *extra)) == 0
    out = tmp_path / output
    killed = subprocess.run([sys.executable, "-m", "tests.encode_hooked", "kill@commit:2", *_args(short_engine, corpus, out, *extra)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL
    assert encode.main(_args(short_engine, corpus, out, *extra)) == 0
    assert out.read_bytes() == ref.read_bytes()
    s = json.loads(summary_path(out).read_text())
    assert s["resumed_rows"] == 16 and s["long_text"] == "chunk" and s["split_rows"] > 10 and s["chunks"] > s["rows"]
    if "int8" in extra:
        assert s["ranges"] == str(ranges_path(out))
        assert np.load(ranges_path(out)).shape == (2, 32)
        assert ranges_path(out).read_bytes() == ranges_path(ref).read_bytes()


def test_chunk_output_all_has_chunk_and_span_columns(short_engine, corpus, tmp_path, docs):
    pq = pytest.importorskip("pyarrow.parquet")
    out = tmp_path / "chunks.parquet"
    assert encode.main(_args(short_engine, corpus, out, "--long-text", "chunk", "--chunk-output", "all", "--id-field", "id")) == 0
    table = pq.read_table(out)
    assert table.column_names == ["line", "id", "chunk", "span", "embedding"]
    with Encoder(short_engine, long_text="chunk") as enc:
        direct = enc.encode_chunks([[INSTR, d if isinstance(d, str) else d[1]] for d in docs])
    assert table.column("line").to_pylist() == (direct.row + 1).tolist()
    assert table.column("chunk").to_pylist() == direct.index.tolist()
    assert table.column("span").to_pylist() == direct.span.tolist()
    got = np.array(table.column("embedding").to_pylist(), dtype=np.float32)
    np.testing.assert_allclose(got, direct.vectors, atol=1e-6, rtol=0)
    assert json.loads(summary_path(out).read_text())["output_vectors"] == len(direct.row)


def test_int8_ranges_quantize_a_second_file_the_same_way(short_engine, corpus, tmp_path):
    first = tmp_path / "corpus.npy"
    assert encode.main(_args(short_engine, corpus, first, "--output-dtype", "int8")) == 0
    queries = tmp_path / "queries.jsonl"
    queries.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["a query", "another query"]), encoding="utf-8")
    second = tmp_path / "queries.npy"
    assert encode.main(_args(short_engine, queries, second, "--output-dtype", "int8", "--int8-ranges", str(ranges_path(first)))) == 0
    with Encoder(short_engine) as enc:
        vectors = enc.encode([[INSTR, "a query"], [INSTR, "another query"]])
    np.testing.assert_array_equal(np.load(second), quantize(vectors, "int8", np.load(ranges_path(first))))
    assert ranges_path(second).read_bytes() == ranges_path(first).read_bytes()


@pytest.mark.parametrize("extra,message", [
    (["--chunk-output", "all"], "--chunk-output all goes with --long-text chunk"),
    (["--long-text", "chunk", "--chunk-output", "all"], "--chunk-output all needs a .parquet output"),
    (["--int8-ranges", "r.npy"], "--int8-ranges goes with --output-dtype int8 or uint8"),
    (["--long-text", "chunk", "--chunk-overlap", "-1"], "--chunk-overlap must be >= 0"),
    (["--output-dtype", "int8", "--int8-ranges", "BAD"], "not a ranges .npy file"),
    (["--output-dtype", "int8", "--int8-ranges", "WRONG"], "ranges must be a finite float array of shape (2, 32)"),
    (["--output-dtype", "int4"], "invalid choice: 'int4'"),
])
def test_bad_option_values_exit_2_with_a_message(short_engine, corpus, tmp_path, capsys, extra, message):
    (tmp_path / "BAD").write_text("not numpy")
    np.save(tmp_path / "WRONG.npy", np.zeros((2, 5), np.float32))
    extra = [str(tmp_path / "WRONG.npy") if x == "WRONG" else str(tmp_path / "BAD") if x == "BAD" else x for x in extra]
    with pytest.raises(SystemExit) as exc:
        rc = encode.main(_args(short_engine, corpus, tmp_path / "o.npy", *extra))
        raise SystemExit(rc)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o.npy").exists()


def test_int8_on_a_single_row_without_ranges_says_what_to_pass(short_engine, tmp_path, capsys):
    src = tmp_path / "one.jsonl"
    src.write_text('{"text": "alone"}\n', encoding="utf-8")
    assert encode.main(_args(short_engine, src, tmp_path / "o.npy", "--output-dtype", "uint8")) == 2
    assert "fewer than 2 vectors to take ranges from; pass --int8-ranges" in capsys.readouterr().err
