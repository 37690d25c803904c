"""``runtime.serve`` over HTTP on 127.0.0.1 (in-process uvicorn, tiny engine): OpenAI client, /embed, errors, metrics."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from runtime import Encoder  # noqa: E402
from runtime.serve.app import Service, create_app, engine_devices, open_encoders  # noqa: E402
from runtime.serve.config import ServeConfig, load_instructions  # noqa: E402
from bench.speed.serve import scrape  # noqa: E402
from tests.conftest import assert_torch_free  # noqa: E402
from tests.serve_support import GatedEncoder, live_server, metric, wait_until  # noqa: E402

QUERY = "Represent the Wikipedia question for retrieving supporting documents: "
NAMED = {"query": QUERY, "doc": "Represent the Wikipedia document for retrieval: "}
KEY = "test-key-0123"


@pytest.fixture(scope="module")
def encoder(tiny_engine):
    enc = Encoder(tiny_engine)
    yield enc
    enc.close()


@pytest.fixture(scope="module")
def server(tiny_engine):
    config = ServeConfig(engine=tiny_engine, instructions=NAMED, max_batch_size=8, payload_limit=200_000, max_request_items=300)
    app = create_app(config)
    with live_server(app) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


def vectors_of(response) -> np.ndarray:
    return np.array([d.embedding for d in response.data], dtype=np.float32)


def test_openai_client_gives_golden_vectors_under_concurrency(client, golden_inputs, golden_vectors):
    """The official client, default settings (it asks for base64), 8 threads, mixed instructions per item."""
    rng = np.random.default_rng(1)
    requests = [rng.choice(len(golden_inputs), size=int(rng.integers(1, 12)), replace=False) for _ in range(48)]

    def one(idx):
        r = client.embeddings.create(model="tiny", input=[golden_inputs[i] for i in idx])
        assert [d.index for d in r.data] == list(range(len(idx)))
        assert r.model == "tiny" and r.usage.prompt_tokens == r.usage.total_tokens > 0
        return idx, vectors_of(r)

    with ThreadPoolExecutor(8) as pool:
        for idx, vectors in pool.map(one, requests):
            np.testing.assert_allclose(vectors, golden_vectors[idx], atol=1e-5)


def test_base64_equals_float(client, golden_inputs):
    as_b64 = client.embeddings.create(model="tiny", input=golden_inputs[:20], encoding_format="base64")
    as_float = vectors_of(client.embeddings.create(model="tiny", input=golden_inputs[:20], encoding_format="float"))
    decoded = np.array([np.frombuffer(__import__("base64").b64decode(d.embedding), dtype="<f4") for d in as_b64.data])
    np.testing.assert_array_equal(decoded, as_float)
    np.testing.assert_array_equal(vectors_of(client.embeddings.create(model="tiny", input=golden_inputs[:20])), as_float)


def test_instructions_given_named_and_on_embed(server, client, encoder):
    texts = ["where is the food stored in a yam plant", "how do planes fly"]
    expected = encoder.encode([[QUERY, t] for t in texts])
    named = client.embeddings.create(model="tiny", input=texts, extra_body={"instruction_name": "query"})
    given = client.embeddings.create(model="tiny", input=texts, extra_body={"instruction": QUERY})
    np.testing.assert_allclose(vectors_of(named), expected, atol=1e-5)
    np.testing.assert_allclose(vectors_of(given), expected, atol=1e-5)
    tei = httpx.post(f"{server}/embed", json={"inputs": texts, "prompt_name": "query"})
    assert tei.status_code == 200
    np.testing.assert_allclose(np.array(tei.json(), dtype=np.float32), expected, atol=1e-5)
    single = httpx.post(f"{server}/embed", json={"inputs": "plain text"}).json()
    np.testing.assert_allclose(np.array(single, dtype=np.float32), encoder.encode(["plain text"]), atol=1e-5)


def test_long_text_truncated_or_refused(server, encoder):
    long = "word " * 2000
    ok = httpx.post(f"{server}/embed", json={"inputs": [long]})
    assert ok.status_code == 200
    np.testing.assert_allclose(np.array(ok.json(), dtype=np.float32), encoder.encode([long]), atol=1e-5)
    refused = httpx.post(f"{server}/embed", json={"inputs": ["short", long], "truncate": False})
    assert refused.status_code == 413 and "inputs[1]" in refused.json()["error"]["message"]


BAD_REQUESTS = [
    # (path, raw body or JSON, status, words the message must contain)
    ("/v1/embeddings", b'{"input": ["a"', 400, ["malformed JSON", "line 1"]),
    ("/v1/embeddings", b'{"input": ["ok", "\\ud800 lone"]}', 400, ["input[1]", "lone surrogate"]),
    ("/v1/embeddings", b"[" * 50_000 + b"]" * 50_000, 400, ["nested too deeply"]),
    ("/v1/embeddings", {"input": ["ok", ["I", "t", 0, "extra"]]}, 400, ["input[1]", "4 elements"]),
    ("/v1/embeddings", {"input": ["ok", ["I", 5]]}, 400, ["input[1]", "text"]),
    ("/v1/embeddings", {"input": []}, 400, ["empty"]),
    ("/v1/embeddings", {"model": "tiny"}, 400, ["input is required"]),
    ("/v1/embeddings", {"input": [1, 2, 3]}, 400, ["token ids"]),
    ("/v1/embeddings", {"input": [[1, 2, 3]]}, 400, ["input[0]", "token ids"]),
    ("/v1/embeddings", {"input": "x", "dimensions": 16}, 400, ["dimensions=16", "32"]),
    ("/v1/embeddings", {"input": "x", "encoding_format": "int8"}, 400, ["encoding_format"]),
    ("/v1/embeddings", {"input": "x", "instruction_name": "nope"}, 400, ["nope", "doc, query"]),
    ("/v1/embeddings", {"input": "x", "instruction": "I: ", "instruction_name": "query"}, 400, ["not both"]),
    ("/v1/embeddings", [1, 2], 400, ["JSON object"]),
    ("/v1/embeddings", {"input": ["x"] * 301}, 413, ["301 items"]),
    ("/v1/embeddings", {"input": "x" * 300_000}, 413, ["payload limit"]),
    ("/embed", {"inputs": "x", "normalize": False}, 400, ["normalize"]),
    ("/embed", {"inputs": "x", "truncate": "yes"}, 400, ["truncate"]),
    ("/embed", {"inputs": "x", "prompt_name": "nope"}, 400, ["doc, query"]),
    ("/embed", {"inputs": {"a": 1}}, 400, ["inputs must be"]),
    # numbers and nesting anywhere in the body: orjson's limits, a JSON error, never a 500
    ("/v1/embeddings", b'{"input": "x", "n": ' + b"9" * 5000 + b"}", 400, ["malformed JSON", "line 1, column 21"]),
    ("/v1/embeddings", b'{"input": ["\\ud800"], "n": ' + b"9" * 5000 + b"}", 400, ["out of range", "5000 characters"]),
    ("/v1/embeddings", b'{"input": ["\\ud800"], "n": NaN}', 400, ["NaN is not a JSON value"]),
    ("/v1/embeddings", b'{"input": "x", "n": 1e999}', 400, ["malformed JSON"]),
    ("/v1/embeddings", b'{"input": "x", "n": ' + b"[" * 1100 + b"]" * 1100 + b"}", 400, ["malformed JSON"]),
    ("/v1/embeddings", b'{"input": ["\\ud800"], "n": ' + b"[" * 1100 + b"]" * 1100 + b"}", 400, ["nested too deeply"]),
    ("/v1/embeddings", b'{"input": "x", "encoding_format": ' + b"[" * 1000 + b"]" * 1000 + b"}", 400, ["encoding_format", "got an array"]),
    ("/v1/embeddings", b'{"input": "x", "embedding_type": ' + b"[" * 1000 + b"]" * 1000 + b"}", 400, ["embedding_type", "got an array"]),
    ("/v1/embeddings", {"input": "x", "embedding_type": {"a": 1}}, 400, ["embedding_type", "got an object"]),
    ("/v1/embeddings", {"input": "x", "encoding_format": "z" * 100_000}, 400, ["encoding_format", "100000 characters"]),
    ("/embed", b'{"inputs": "x", "truncation_direction": ' + b"[" * 1000 + b"]" * 1000 + b"}", 400, ["truncation_direction", "got an array"]),
    ("/v1/embeddings", b'{"input": ' + b"[" * 1000 + b"]" * 1000 + b"}", 400, ["input[0]"]),
]


@pytest.mark.parametrize("path,body,status,words", BAD_REQUESTS, ids=[f"{i}-{b[2]}" for i, b in enumerate(BAD_REQUESTS)])
def test_bad_requests_get_openai_style_errors(server, path, body, status, words):
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(f"{server}{path}", headers={"content-type": "application/json"}, **kwargs)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "code"}
    for word in words:
        assert word in err["message"], err["message"]
    assert httpx.get(f"{server}/health").status_code == 200


@pytest.mark.parametrize("limit", [1000, 5000])
def test_json_depth_rule_holds_whatever_the_recursion_limit(limit):
    """The lone-surrogate path parses with the standard library, whose depth limit is the interpreter's recursion
    limit; torch's compiler raises that to 2000, which once let a 1,100-deep body through there. Both paths must
    refuse past 1,024 levels and take a 500-deep value, whoever set the limit."""
    from runtime.serve.errors import ApiError
    from runtime.serve.requests import parse_json

    saved = sys.getrecursionlimit()
    sys.setrecursionlimit(limit)
    try:
        for text in (b'"\\ud800"', b'"x"'):
            with pytest.raises(ApiError, match="nested too deeply"):
                parse_json(b'{"input": [' + text + b'], "n": ' + b"[" * 1100 + b"]" * 1100 + b"}")
            body = parse_json(b'{"input": [' + text + b'], "n": ' + b"[" * 500 + b"]" * 500 + b', "m": "[[{"}')
            assert body["m"] == "[[{" and len(body["input"]) == 1
    finally:
        sys.setrecursionlimit(saved)


@pytest.mark.parametrize("method,path,status", [("GET", "/nowhere", 404), ("GET", "/v1/embeddings", 405), ("DELETE", "/embed", 405)])
def test_framework_errors_are_json(server, method, path, status):
    r = httpx.request(method, f"{server}{path}")
    assert r.status_code == status
    assert r.headers["content-type"] == "application/json" and r.json()["error"]["message"]


def test_openai_client_raises_on_errors(client):
    with pytest.raises(openai.BadRequestError, match="dimensions"):
        client.embeddings.create(model="tiny", input="x", dimensions=8)


def test_health_info_models(server):
    assert httpx.get(f"{server}/health").json() == {"status": "ok"}
    info = httpx.get(f"{server}/info").json()
    assert info["embedding_dim"] == 32 and info["max_seq_length"] == 512 and info["precision"] == "fp32"
    assert info["backend"].startswith("onnxruntime") and info["instructions"] == ["doc", "query"]
    assert info["limits"]["max_batch_size"] == 8 and "onnxruntime" in info["versions"]
    assert httpx.get(f"{server}/v1/models").json()["data"][0]["id"] == "tiny"


def test_default_server_runs_two_cpu_engines_with_one_core_each(server, tiny_engine):
    """The default (--replicas 0) on this CPU: two ONNX engines behind the one queue, the cores shared out."""
    info = httpx.get(f"{server}/info").json()
    cores = os.cpu_count() or 1
    assert [e["device"] for e in info["engines"]] == (["cpu", "cpu"] if cores >= 2 else ["cpu"])


def test_engine_devices(tiny_engine, tmp_path):
    """--replicas 0: two engines for an ONNX engine on a CPU of 2+ cores, else one; one per GPU; explicit counts kept."""
    auto = ServeConfig(engine=tiny_engine)
    assert engine_devices(auto, cores=2) == [None, None] and engine_devices(auto, cores=1) == [None]
    assert engine_devices(ServeConfig(engine=tiny_engine, device="cpu"), cores=16) == ["cpu", "cpu"]
    assert engine_devices(ServeConfig(engine=tiny_engine, device="cuda:0,cuda:1"), cores=16) == ["cuda:0", "cuda:1"]
    assert engine_devices(ServeConfig(engine=tiny_engine, replicas=1), cores=16) == [None]
    assert engine_devices(ServeConfig(engine=tiny_engine, replicas=3, device="cpu"), cores=2) == ["cpu"] * 3
    assert engine_devices(ServeConfig(engine=tmp_path / "m.pt2"), cores=16) == [None]  # torch sets its own threads
    with pytest.raises(ValueError, match="replicas must be >= 0"):
        ServeConfig(engine=tiny_engine, replicas=-1)
    with pytest.raises(ValueError, match="--threads applies to ONNX Runtime engines only"):
        open_encoders(ServeConfig(engine=tmp_path / "m.pt2", threads=2))


def test_metrics_count_requests(server):
    before = scrape(server)
    for _ in range(3):
        assert httpx.post(f"{server}/embed", json={"inputs": ["a", "b"]}).status_code == 200
    assert httpx.post(f"{server}/embed", json={"inputs": []}).status_code == 400
    after = scrape(server)
    diff = lambda key: after.get(key, 0) - before.get(key, 0)  # noqa: E731
    assert diff('instructor_requests_total{endpoint="/embed",status="200"}') == 3
    assert diff('instructor_requests_total{endpoint="/embed",status="400"}') == 1
    assert diff("instructor_items_total") == 6
    assert diff("instructor_tokens_total") >= 6 and after["instructor_padded_tokens_total"] >= after["instructor_tokens_total"]
    assert diff('instructor_request_duration_seconds_count{endpoint="/embed"}') == 4
    assert after["instructor_batch_size_count"] > 0 and after["instructor_queue_seconds_count"] > 0
    assert after["instructor_peak_rss_bytes"] > 1e6 or sys.platform != "linux"  # VmHWM comes from /proc


def test_api_key(tiny_engine):
    app = create_app(ServeConfig(engine=tiny_engine, api_key=KEY))
    with live_server(app) as url:
        assert httpx.get(f"{url}/health").status_code == 200  # probes need no key
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            r = httpx.post(f"{url}/v1/embeddings", json={"input": "x"}, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(f"{url}/metrics").status_code == 401
        good = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
        assert len(good.embeddings.create(model="tiny", input=["x", "y"]).data) == 2
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).embeddings.create(model="tiny", input="x")
        auth = {"Authorization": f"Bearer {KEY}"}
        assert metric(url, "instructor_requests_total", headers=auth, endpoint="/v1/embeddings", status="401") == 4


@contextmanager
def one_running_one_queued(url: str, gated: GatedEncoder) -> Iterator[None]:
    """A request held at the engine and a second waiting in the queue; on exit both are let through and answered 200."""
    gated.entered.clear()
    gated.gate.clear()
    results: dict[str, httpx.Response] = {}

    def post(name: str, text: str) -> None:
        results[name] = httpx.post(f"{url}/v1/embeddings", json={"input": [text]}, timeout=120)

    first = threading.Thread(target=post, args=("first", "held at the engine"))
    first.start()
    assert gated.entered.wait(120)
    second = threading.Thread(target=post, args=("second", "waits in the queue"))
    second.start()
    wait_until(lambda: metric(url, "instructor_queue_items") == 1, "the second request in the queue")
    yield
    gated.gate.set()
    first.join(120)
    second.join(120)
    assert results["first"].status_code == 200 and results["second"].status_code == 200
    assert httpx.get(f"{url}/health").status_code == 200


def test_429_with_retry_after_when_queue_is_full(tiny_engine, encoder):
    """A request runs (held at the engine), a second is queued, a third passes --max-queue-tokens: it waits for room
    --queue-timeout seconds, then 429, before its body is parsed (so refusals stay cheap)."""
    gated = GatedEncoder(Encoder(tiny_engine))
    app = create_app(ServeConfig(engine=tiny_engine, max_queue_tokens=4, max_wait_ms=0, queue_timeout=0.3), opener=lambda: [gated])
    with live_server(app) as url, one_running_one_queued(url, gated):
        t0 = time.monotonic()
        third = httpx.post(f"{url}/v1/embeddings", json={"input": ["refused"]})
        assert third.status_code == 429 and time.monotonic() - t0 >= 0.3
        assert int(third.headers["retry-after"]) >= 1 and third.json()["error"]["code"] == "queue_full"
        unparsed = httpx.post(f"{url}/v1/embeddings", content=b"{not json", headers={"content-type": "application/json"})
        assert unparsed.status_code == 429
        assert metric(url, "instructor_requests_waiting") == 0


def test_a_request_waiting_for_room_is_let_in_when_the_queue_drains(tiny_engine, encoder):
    """With room made within --queue-timeout, a waiting request is answered 200 with its exact vector, not refused;
    one whose client leaves while it waits is dropped at once (499), not at its timeout."""
    gated = GatedEncoder(Encoder(tiny_engine))
    app = create_app(ServeConfig(engine=tiny_engine, max_queue_tokens=4, max_wait_ms=0, queue_timeout=60), opener=lambda: [gated])
    answer: dict[str, httpx.Response] = {}
    waiter = threading.Thread(target=lambda: answer.update(r=httpx.post(f"{url}/v1/embeddings", json={"input": ["waits"]}, timeout=120)))
    with live_server(app) as url:
        with one_running_one_queued(url, gated):
            with pytest.raises(httpx.TimeoutException):  # the queue stays full while the gate is shut: it waits
                httpx.post(f"{url}/v1/embeddings", json={"input": ["leaves"]}, timeout=0.5)
            wait_until(lambda: metric(url, "instructor_requests_total", endpoint="/v1/embeddings", status="499") == 1,
                       "the request whose client left counted as 499")
            assert metric(url, "instructor_requests_waiting") == 0
            waiter.start()
            wait_until(lambda: metric(url, "instructor_requests_waiting") == 1, "the next request waiting for room")
        waiter.join(120)
        assert answer["r"].status_code == 200
        got = np.array(answer["r"].json()["data"][0]["embedding"], np.float32)
        np.testing.assert_allclose(got, encoder.encode(["waits"])[0], atol=1e-6)
        assert metric(url, "instructor_requests_waiting") == 0


def test_a_waiting_request_that_is_cancelled_leaves_no_reservation(tiny_engine):
    """A request cancelled while it waits for room (as at shutdown) leaves the line, and one cancelled just as it was
    let in gives its reserved tokens back, so later requests are not held out by tokens no one will submit."""

    class Full:  # a queue with room only when told
        room = False

        def room_for(self, tokens: int, reserved: int = 0) -> bool:
            return self.room and reserved + tokens <= 10

    class Silent:  # a client that neither sends more nor leaves
        async def receive(self) -> dict:
            await asyncio.Event().wait()
            return {}

    async def scenario() -> None:
        service = Service(ServeConfig(engine=tiny_engine, queue_timeout=60), opener=lambda: [])
        service.batcher = Full()  # type: ignore[assignment]
        waiter = asyncio.ensure_future(service._let_in(Silent(), 4))  # type: ignore[arg-type]
        await asyncio.sleep(0.01)
        assert len(service.waiting) == 1 and service.reserved == 0
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)
        assert not service.waiting and service.reserved == 0
        waiter = asyncio.ensure_future(service._let_in(Silent(), 4))  # type: ignore[arg-type]
        await asyncio.sleep(0.01)
        service.batcher.room = True  # type: ignore[attr-defined]
        service._let_waiting_in()  # let in, and cancelled before it resumes
        assert service.reserved == 4
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)
        assert not service.waiting and service.reserved == 0
        service.pool.shutdown()

    asyncio.run(scenario())


def test_429_before_parsing_when_the_body_cannot_fit(tiny_engine):
    """The queue has room, but not for as many tokens as a body of this size holds (the measured tokens per byte of
    earlier bodies): 429 before the body is parsed (--queue-timeout 0: at once). A small body still gets parsed
    (here: 400 for bad JSON)."""
    gated = GatedEncoder(Encoder(tiny_engine))
    app = create_app(ServeConfig(engine=tiny_engine, max_queue_tokens=64, max_wait_ms=0, queue_timeout=0), opener=lambda: [gated])
    with live_server(app) as url, one_running_one_queued(url, gated):
        assert 0 < metric(url, "instructor_queue_tokens") < 64
        big = b'{"input": ["' + b"many words " * 200 + b'"' + b"not json"
        assert httpx.post(f"{url}/v1/embeddings", content=big, headers={"content-type": "application/json"}).status_code == 429
        small = httpx.post(f"{url}/v1/embeddings", content=b"{not json", headers={"content-type": "application/json"})
        assert small.status_code == 400


def test_instructions_file_errors(tmp_path):
    good = tmp_path / "good.json"
    good.write_text(json.dumps(NAMED))
    assert load_instructions(good) == NAMED
    for text, words in [("[1]", "object"), ('{"q": 3}', "'q' must be a string"), ("{", "not valid JSON"),
                        ('{"q": "Represent \\ud800: "}', "'q': its text is invalid unicode"),
                        ('{"\\udc00": "I: "}', "'\\\\udc00': its name is invalid unicode")]:
        bad = tmp_path / "bad.json"
        bad.write_text(text)
        with pytest.raises(ValueError, match=words):
            load_instructions(bad)
    with pytest.raises(ValueError, match="cannot read"):
        load_instructions(tmp_path / "missing.json")


def test_server_never_imports_torch(tiny_engine):
    """The server's modules, app start-up and one request in a fresh interpreter: torch, trainer, export stay out."""
    code = f"""
import sys
import runtime.serve.__main__
from starlette.testclient import TestClient
from runtime.serve.app import create_app
from runtime.serve.config import ServeConfig
with TestClient(create_app(ServeConfig(engine={str(tiny_engine)!r}))) as client:
    assert client.post("/v1/embeddings", json={{"input": ["a", ["I: ", "b"]]}}).status_code == 200
"""
    assert_torch_free(code)


def test_engine_failure_is_a_500_for_that_request_only(tiny_engine):
    broken = GatedEncoder(Encoder(tiny_engine))
    with live_server(create_app(ServeConfig(engine=tiny_engine), opener=lambda: [broken])) as url:
        broken.fail_next = "engine exploded"
        r = httpx.post(f"{url}/v1/embeddings", json={"input": ["x"]})
        assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error" and "engine exploded" in r.json()["error"]["message"]
        assert httpx.post(f"{url}/v1/embeddings", json={"input": ["x"]}).status_code == 200
        assert httpx.get(f"{url}/health").status_code == 200
