"""runtime.client: request planning under the server's limits, base64 decoding, retries (429 Retry-After, 503,
refused connections) against a stub server, timeouts, the API key, and the vectors of a live server equal to
Encoder's, sync and async. Every retry test records the waits instead of sleeping: nothing here races a clock."""

from __future__ import annotations

import asyncio
import base64
import threading
from email.utils import format_datetime
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest

pytest.importorskip("httpx", reason="runtime.client needs httpx: pip install 'instructor-stack[client]'")
pytest.importorskip("starlette", reason="the live and stub servers need the [serve] extra")
pytest.importorskip("uvicorn", reason="the live and stub servers need the [serve] extra")

from starlette.applications import Starlette  # noqa: E402
from starlette.requests import Request  # noqa: E402
from starlette.responses import JSONResponse, Response  # noqa: E402
from starlette.routing import Route  # noqa: E402

from runtime import Encoder  # noqa: E402
from runtime.client import (  # noqa: E402
    MAX_RETRY_WAIT,
    AsyncClient,
    Client,
    ClientError,
    Limits,
    ServerError,
    decode_vectors,
    plan_requests,
    retry_delay,
)
from runtime.serve.app import create_app  # noqa: E402
from runtime.serve.config import ServeConfig  # noqa: E402
from tests.conftest import assert_torch_free  # noqa: E402
from tests.serve_support import free_port, live_server, metric  # noqa: E402

Q = "Represent the Wikipedia question for retrieving supporting documents: "
D = "Represent the Wikipedia document for retrieval: "
NAMED = {"query": Q, "doc": D}
MIXED = [[Q, "where is the food stored in a yam plant"], [D, "Yams are perennial herbaceous vines."], "plain text", "",
         [D, "Aspirin lowers fever.", 0], [Q, "what reduces fever " * 30]]


class Sleeps(list):
    """A stand-in for time.sleep that records the waits."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


class AsyncSleeps(list):
    async def __call__(self, seconds: float) -> None:
        self.append(seconds)


# ---- planning and decoding, no server ------------------------------------------------------------------------------


def _sizes(call) -> list[tuple[int, int, int]]:
    return [(start, count, len(body)) for start, count, body in call.bodies]


def test_plan_keeps_order_and_every_request_under_the_item_and_byte_limits():
    items = [[Q, f"text {i} " * (i % 9)] for i in range(40)]
    limits = Limits(max_request_items=7, payload_limit=600)
    call = plan_requests(items, limits, batch_size=100, options={"encoding_format": "base64"})
    import json

    got = []
    for start, count, body in call.bodies:
        assert count <= 7 and len(body) <= 600
        parsed = json.loads(body)
        assert parsed["encoding_format"] == "base64" and len(parsed["input"]) == count
        assert start == len(got)
        got.extend(parsed["input"])
    assert got == items
    assert len(call.bodies) > 40 // 7  # the byte limit cut some requests before 7 items


def test_plan_batch_size_is_items_per_request_and_a_string_is_one_item():
    call = plan_requests([f"t{i}" for i in range(10)], Limits(2048, 2_000_000), batch_size=4, options={})
    assert [(s, c) for s, c, _ in call.bodies] == [(0, 4), (4, 4), (8, 2)]
    single = plan_requests("one text", Limits(2048, 2_000_000), batch_size=4, options={})
    assert single.single and single.count == 1 and single.bodies[0][2] == b'{"input":["one text"]}'


def test_plan_refuses_an_item_no_request_can_carry_naming_it():
    with pytest.raises(ValueError, match=r"input\[2\] is \d+ bytes as JSON, over .* payload limit of 300"):
        plan_requests(["a", "b", "x" * 400], Limits(2048, 300), batch_size=8, options={})


def test_plan_escapes_a_lone_surrogate_so_the_server_can_name_it():
    call = plan_requests(["ok", "bad \ud800"], Limits(2048, 2_000_000), batch_size=8, options={})
    assert b'"bad \\ud800"' in call.bodies[0][2]
    call.bodies[0][2].decode("utf-8")  # valid UTF-8 on the wire


def test_decode_orders_rows_by_index_in_the_requested_dtype():
    rows = np.arange(6, dtype="<f4").reshape(2, 3)
    body = {"data": [{"index": 1, "embedding": base64.b64encode(rows[1].tobytes()).decode()},
                     {"index": 0, "embedding": base64.b64encode(rows[0].tobytes()).decode()}]}
    np.testing.assert_array_equal(decode_vectors(body, 2, np.dtype("<f4")), rows)
    with pytest.raises(ClientError, match="1 vectors for 2 items"):
        decode_vectors({"data": body["data"][:1]}, 2, np.dtype("<f4"))
    with pytest.raises(ClientError, match="not a list of base64 embeddings by index"):
        decode_vectors({"data": [{"index": 5, "embedding": body["data"][0]["embedding"]}]}, 1, np.dtype("<f4"))


def test_retry_delay_honours_retry_after_in_seconds_or_as_a_date_and_backs_off_without_it():
    assert retry_delay({"retry-after": "7"}, attempt=3, backoff=0.5) == 7.0
    assert retry_delay({"retry-after": "3600"}, attempt=0, backoff=0.5) == MAX_RETRY_WAIT
    later = format_datetime(datetime.now(timezone.utc) + timedelta(seconds=30), usegmt=True)
    assert 20 < retry_delay({"retry-after": later}, attempt=0, backoff=0.5) <= 30
    assert [retry_delay({}, a, 0.5) for a in range(4)] == [0.5, 1.0, 2.0, 4.0]
    assert retry_delay({"retry-after": "soon"}, attempt=1, backoff=0.5) == 1.0


def test_client_module_needs_no_torch():
    assert_torch_free("import runtime.client, runtime.adapters, runtime.adapters.embedder")


# ---- a stub server: scripted answers, counted requests ------------------------------------------------------------


class Stub:
    """An HTTP server whose POST /v1/embeddings answers from a script (status, headers) and then 200 with vectors
    i + 0.5 for item i; GET /info is 404 (a server without /info: the client uses runtime.serve's defaults)."""

    def __init__(self, script: list[tuple[int, dict[str, str]]]) -> None:
        self.script = list(script)
        self.requests: list[dict] = []
        self.headers: list[dict[str, str]] = []
        self.release = threading.Event()  # for the "never answers" route
        routes = [Route("/v1/embeddings", self.embeddings, methods=["POST"]), Route("/slow/v1/embeddings", self.slow, methods=["POST"])]
        self.app = Starlette(routes=routes)

    async def embeddings(self, request: Request) -> Response:
        body = await request.json()
        self.requests.append(body)
        self.headers.append(dict(request.headers))
        if self.script:
            status, headers = self.script.pop(0)
            return JSONResponse({"error": {"message": f"scripted {status}", "type": "x", "param": None, "code": f"s{status}"}},
                                status_code=status, headers=headers)
        data = [{"object": "embedding", "index": i, "embedding": base64.b64encode(np.full(4, i + 0.5, "<f4").tobytes()).decode()}
                for i in range(len(body["input"]))]
        return JSONResponse({"object": "list", "data": data})

    async def slow(self, request: Request) -> Response:
        await asyncio.to_thread(self.release.wait, 30)
        return JSONResponse({"error": {"message": "released", "code": "x"}}, status_code=500)


def _expected(n: int) -> np.ndarray:
    return np.repeat(np.arange(n, dtype=np.float32)[:, None] + 0.5, 4, axis=1)


def test_429_waits_the_servers_retry_after_then_succeeds():
    stub = Stub([(429, {"Retry-After": "7"}), (429, {"Retry-After": "2"})])
    sleeps = Sleeps()
    with live_server(stub.app) as url, Client(url, sleep=sleeps) as client:
        got = client.encode(["a", "b", "c"])
    np.testing.assert_array_equal(got, _expected(3))
    assert sleeps == [7.0, 2.0]
    assert len(stub.requests) == 3 and all(r["input"] == ["a", "b", "c"] for r in stub.requests)


def test_503_while_draining_is_retried_with_backoff_and_a_400_is_not():
    stub = Stub([(503, {}), (503, {}), (400, {})])
    sleeps = Sleeps()
    with live_server(stub.app) as url, Client(url, sleep=sleeps, backoff=0.25) as client:
        with pytest.raises(ServerError) as err:
            client.encode(["a"])
    assert sleeps == [0.25, 0.5]  # two 503s, then the 400 ends the call
    assert err.value.status == 400 and err.value.code == "s400" and len(stub.requests) == 3


def test_retries_end_after_max_retries_with_the_last_error():
    stub = Stub([(429, {"Retry-After": "1"})] * 5)
    sleeps = Sleeps()
    with live_server(stub.app) as url, Client(url, sleep=sleeps, max_retries=2) as client:
        with pytest.raises(ServerError, match="HTTP 429 s429"):
            client.encode(["a"])
    assert sleeps == [1.0, 1.0] and len(stub.requests) == 3


def test_async_client_retries_429_with_retry_after():
    stub = Stub([(429, {"Retry-After": "5"})])
    sleeps = AsyncSleeps()

    async def run(url: str) -> np.ndarray:
        async with AsyncClient(url, sleep=sleeps) as client:
            return await client.encode(["a", "b"])

    with live_server(stub.app) as url:
        got = asyncio.run(run(url))
    np.testing.assert_array_equal(got, _expected(2))
    assert sleeps == [5.0]


def test_a_refused_connection_is_retried_then_reported():
    sleeps = Sleeps()
    with Client(f"http://127.0.0.1:{free_port()}", sleep=sleeps, max_retries=2, backoff=0.5,
                limits=Limits(2048, 2_000_000)) as client:
        with pytest.raises(ClientError, match="ConnectError"):
            client.encode(["a"])
    assert sleeps == [0.5, 1.0]


def test_a_read_timeout_ends_the_call_without_retrying():
    stub = Stub([])
    sleeps = Sleeps()
    with live_server(stub.app) as url:
        try:
            with Client(f"{url}/slow", timeout=0.2, sleep=sleeps, limits=Limits(2048, 2_000_000)) as client:
                with pytest.raises(ClientError, match=r"no answer within 0.2 s \(timeout\)"):
                    client.encode(["a"])
        finally:
            stub.release.set()
    assert sleeps == []


def test_api_key_is_sent_as_bearer_from_the_argument_or_the_environment(monkeypatch):
    stub = Stub([])
    with live_server(stub.app) as url:
        with Client(url, api_key="k1") as client:
            client.encode(["a"])
        monkeypatch.setenv("INSTRUCTOR_API_KEY", "k2")
        with Client(url) as client:
            client.encode(["a"])
    assert [h.get("authorization") for h in stub.headers] == ["Bearer k1", "Bearer k2"]


# ---- a live runtime.serve ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def encoder(tiny_engine):
    with Encoder(tiny_engine) as enc:
        yield enc


@pytest.fixture(scope="module")
def server(tiny_engine):
    """Small limits, so that an input of a few dozen items needs several requests."""
    config = ServeConfig(engine=tiny_engine, instructions=NAMED, max_request_items=8, payload_limit=1500, api_key="secret")
    with live_server(create_app(config)) as url:
        yield url


def test_vectors_equal_encoder_across_several_requests(server, encoder):
    items = MIXED * 6
    before = metric(server, "instructor_requests_total", {"Authorization": "Bearer secret"}, endpoint="/v1/embeddings", status="200")
    with Client(server, api_key="secret") as client:
        got = client.encode(items, batch_size=64)
        assert client.limits == Limits(max_request_items=8, payload_limit=1500, embedding_dim=encoder.embedding_dim)
    sent = metric(server, "instructor_requests_total", {"Authorization": "Bearer secret"}, endpoint="/v1/embeddings", status="200") - before
    assert sent >= len(items) / 8
    assert got.dtype == np.float32 and got.shape == (len(items), encoder.embedding_dim)
    assert np.abs(got - encoder.encode(items)).max() <= 1e-6


def test_async_vectors_equal_encoder_with_concurrent_requests(server, encoder):
    items = MIXED * 6

    async def run() -> np.ndarray:
        async with AsyncClient(server, api_key="secret", max_concurrency=3) as client:
            return await client.encode(items)

    assert np.abs(asyncio.run(run()) - encoder.encode(items)).max() <= 1e-6


def test_given_and_named_instructions_apply_to_plain_strings(server, encoder):
    texts = ["how do planes fly", "why is the sky blue"]
    with Client(server, api_key="secret") as client:
        named = client.encode(texts, instruction_name="query")
        given = client.encode(texts, instruction=D)
        one = client.encode("how do planes fly", instruction_name="query")
    assert np.abs(named - encoder.encode([[Q, t] for t in texts])).max() <= 1e-6
    assert np.abs(given - encoder.encode([[D, t] for t in texts])).max() <= 1e-6
    assert one.shape == (encoder.embedding_dim,) and np.abs(one - named[0]).max() <= 1e-6


def test_compact_types_and_normalization(server, encoder):
    with Client(server, api_key="secret") as client:
        half = client.encode(MIXED, embedding_type="float16")
        bits = client.encode(MIXED, embedding_type="ubinary")
        normed = client.encode(MIXED, normalize_embeddings=True)
        ref = client.encode(MIXED)  # the same request again: the same batch, so the same bits to quantize
    assert half.dtype == np.float16 and np.array_equal(half, ref.astype(np.float16))
    assert bits.dtype == np.uint8 and np.array_equal(bits, np.packbits(ref > 0, axis=-1))
    assert np.abs(normed - encoder.encode(MIXED, normalize_embeddings=True)).max() <= 1e-6


def test_a_bad_item_is_named_by_its_index_in_the_whole_input(server):
    items = [f"text {i}" for i in range(11)] + [["only one"]]
    with Client(server, api_key="secret") as client, pytest.raises(ServerError) as err:
        client.encode(items)
    assert err.value.status == 400 and err.value.message.startswith("input[11]: ")


def test_a_wrong_api_key_is_a_401_and_is_not_retried(server):
    sleeps = Sleeps()
    with Client(server, api_key="wrong", sleep=sleeps) as client, pytest.raises(ServerError) as err:
        client.encode(["a"])
    assert err.value.status == 401 and sleeps == []


def test_health_and_info(server, encoder):
    with Client(server, api_key="secret") as client:
        assert client.health()
        info = client.info()
    assert info["embedding_dim"] == encoder.embedding_dim and info["instructions"] == sorted(NAMED)
    with Client(f"http://127.0.0.1:{free_port()}") as gone:
        assert not gone.health()
