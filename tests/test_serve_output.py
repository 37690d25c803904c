"""The server's compact vectors (``embedding_type``) and long texts (``--long-text chunk``): the runtime's rules."""

from __future__ import annotations

import base64

import numpy as np
import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from runtime import Encoder  # noqa: E402
from runtime.output_dtype import calibration_ranges, quantize  # noqa: E402
from runtime.serve.app import create_app  # noqa: E402
from runtime.serve.config import ServeConfig  # noqa: E402
from tests.serve_support import live_server  # noqa: E402


@pytest.fixture(scope="module")
def reference(tiny_engine, golden_inputs):
    with Encoder(tiny_engine) as enc:
        return enc.encode(golden_inputs[:20])


@pytest.fixture(scope="module")
def ranges_file(tmp_path_factory, reference):
    path = tmp_path_factory.mktemp("ranges") / "corpus.npy.ranges.npy"
    np.save(path, calibration_ranges(reference))
    return path


@pytest.fixture(scope="module")
def server(tiny_engine, ranges_file):
    # One engine of all cores, as the reference Encoder: another thread count sums floats in another order, and a
    # last-bit difference can move a value to the next int8 step, which would hide what is tested here (the rules).
    with live_server(create_app(ServeConfig(engine=tiny_engine, int8_ranges=ranges_file, replicas=1))) as url:
        yield url


@pytest.mark.parametrize("kind,dtype", [("float16", "float16"), ("int8", "int8"), ("uint8", "uint8"),
                                        ("binary", "int8"), ("ubinary", "uint8")])
def test_embedding_types_equal_the_runtime_rules(server, golden_inputs, reference, ranges_file, kind, dtype):
    expected = quantize(reference, kind, np.load(ranges_file))
    for fmt in ("float", "base64"):
        r = httpx.post(f"{server}/v1/embeddings", json={"input": golden_inputs[:20], "embedding_type": kind, "encoding_format": fmt}, timeout=60)
        assert r.status_code == 200, r.text
        rows = [d["embedding"] for d in r.json()["data"]]
        got = (np.stack([np.frombuffer(base64.b64decode(x), dtype=np.dtype(dtype).newbyteorder("<")) for x in rows])
               if fmt == "base64" else np.array(rows, dtype=dtype))
        np.testing.assert_array_equal(got, expected)
    tei = httpx.post(f"{server}/embed", json={"inputs": golden_inputs[:20], "embedding_type": kind}, timeout=60)
    assert tei.status_code == 200 and np.array_equal(np.array(tei.json(), dtype=dtype), expected)


def test_unknown_type_and_missing_ranges_are_400(server, tiny_engine, golden_inputs):
    r = httpx.post(f"{server}/v1/embeddings", json={"input": "x", "embedding_type": "int4"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_value" and "embedding_type" in r.json()["error"]["message"]
    info = httpx.get(f"{server}/info", timeout=30).json()
    assert info["embedding_types"] == ["float", "float16", "int8", "uint8", "binary", "ubinary"] and info["long_text"] == "truncate"
    with live_server(create_app(ServeConfig(engine=tiny_engine))) as bare:
        r = httpx.post(f"{bare}/v1/embeddings", json={"input": "x", "embedding_type": "uint8"}, timeout=30)
        assert r.status_code == 400 and "--int8-ranges" in r.json()["error"]["message"]
        assert "uint8" not in httpx.get(f"{bare}/info", timeout=30).json()["embedding_types"]
        assert httpx.get(f"{bare}/health", timeout=30).status_code == 200


def test_a_chunking_server_gives_the_chunked_vectors(tiny_engine_64):
    short = tiny_engine_64  # the tiny bundle with a 64-token window, so that texts are long
    texts = [["Represent the document: ", "word " * n] for n in (10, 100, 300)]
    with Encoder(short, long_text="chunk", chunk_overlap=8) as enc:
        expected = enc.encode(texts)
    with live_server(create_app(ServeConfig(engine=short, long_text="chunk", chunk_overlap=8))) as url:
        r = httpx.post(f"{url}/embed", json={"inputs": texts, "truncate": False}, timeout=60)
        assert r.status_code == 200, r.text  # nothing is cut, so truncate=false is no 413
        np.testing.assert_allclose(np.array(r.json(), dtype=np.float32), expected, atol=1e-6, rtol=0)
        assert httpx.get(f"{url}/info", timeout=30).json()["long_text"] == "chunk"
