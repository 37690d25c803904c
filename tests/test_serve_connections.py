"""Slow, idle and oversized clients against ``python -m runtime.serve``: head and body deadlines, head limits (431),
the connection cap, and 10,000 idle connections while a normal client is served.

The deadlines are what these tests exercise, so they wait for them; but no outcome depends on how fast the machine
is: a deadline is checked from below (nothing is cut before it) and by what only it can do (a 408 and a closed
connection, where nothing else would close one), never by an upper bound on elapsed time. Where a test needs the
server in some state (connections accepted or closed), it waits for the server's own counters to say so.
"""

from __future__ import annotations

import asyncio
import json
import resource
import socket
import time
from typing import Any

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
pytest.importorskip("httptools")

from tests.serve_support import ServerProcess, live_server, metric, wait_until  # noqa: E402

BODY = json.dumps({"input": ["a normal request"]}).encode()
HEAD_LIMIT = 8192  # the module server's --max-head-bytes


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=60)


def read_until_closed(s: socket.socket, timeout: float = 60) -> tuple[bytes, bool]:
    """Everything the server sends, and whether it then closed the connection (False: ``timeout`` passed first)."""
    s.settimeout(timeout)
    data = b""
    try:
        while chunk := s.recv(65536):
            data += chunk
    except socket.timeout:
        return data, False
    except ConnectionResetError:
        pass
    return data, True


def request(head_extra: bytes = b"", body: bytes = BODY) -> bytes:
    return (b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + head_extra
            + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


def one_response(s: socket.socket) -> bytes:
    """One HTTP response read off a keep-alive connection (head, then Content-Length bytes of body)."""
    s.settimeout(60)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        assert chunk, f"connection closed after {data[:100]!r}"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    while len(body) < length:
        body += s.recv(65536)
    return head + b"\r\n\r\n" + body


def normal_request(url: str) -> None:
    r = httpx.post(f"{url}/v1/embeddings", json={"input": ["a normal request"]}, timeout=60)
    assert r.status_code == 200 and len(r.json()["data"]) == 1


@pytest.fixture(scope="module")
def server(tiny_engine):
    with ServerProcess(tiny_engine, "--head-timeout", "1", "--body-timeout", "1", "--max-head-bytes", str(HEAD_LIMIT)) as s:
        yield s.url


def test_slowloris_head_gets_408_and_is_closed(server):
    """A head sent a byte at a time is cut off at --head-timeout with a JSON 408, and not before it."""
    s = connect(server)
    s.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\n")
    t0 = time.monotonic()
    answer = b""
    s.settimeout(0.2)
    closed = False
    while time.monotonic() - t0 < 60 and not closed:
        try:
            s.sendall(b"X")  # one byte of a header that never ends
            chunk = s.recv(65536)
            closed = not chunk
            answer += chunk
        except socket.timeout:
            continue
        except (BrokenPipeError, ConnectionResetError):
            closed = True
    took = time.monotonic() - t0
    s.close()
    assert closed and answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_timeout"
    assert took > 0.8  # not cut before the deadline (1 s from the first byte)
    assert metric(server, "instructor_connections_closed_total", reason="head_timeout") >= 1


def test_silent_connection_is_closed_without_an_answer(server):
    s = connect(server)
    t0 = time.monotonic()
    data, closed = read_until_closed(s)
    s.close()
    assert closed and data == b"" and time.monotonic() - t0 > 0.8


def test_body_that_never_finishes_gets_408(server):
    s = connect(server)
    s.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"input\":")
    t0 = time.monotonic()
    data, closed = read_until_closed(s)
    s.close()
    assert closed and data.startswith(b"HTTP/1.1 408"), data[:200]
    assert b'"request_timeout"' in data and b"--body-timeout" in data
    assert time.monotonic() - t0 > 0.8


def test_keep_alive_connection_serves_several_requests_within_the_deadline(server):
    """The head deadline is per request: one connection used for requests 1.5 s apart in all is not cut at 1 s."""
    s = connect(server)
    for _ in range(4):
        s.sendall(request())
        assert one_response(s).startswith(b"HTTP/1.1 200")
        time.sleep(0.5)  # time passes between requests; a per-connection deadline would close the connection here
    s.close()


def test_an_oversized_head_gets_431_and_the_server_goes_on(server):
    """--max-head-bytes: a head over it, sent whole or in pieces, is a JSON 431 and a closed connection; the server
    answers the next client as before."""
    for head in (b"X-Big: " + b"a" * (HEAD_LIMIT + 1000) + b"\r\n", b"X-Big: " + b"a" * (1 << 20) + b"\r\n"):
        s = connect(server)
        try:
            s.sendall(request(head))
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server closed before the 1 MiB was all sent
        data, closed = read_until_closed(s)
        s.close()
        assert closed and data.startswith(b"HTTP/1.1 431"), data[:200]
        assert json.loads(data.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_header_fields_too_large"
    normal_request(server)
    assert metric(server, "instructor_connections_closed_total", reason="head_too_large") == 2


def _guarded_app_server(refused: list[str], **limits: Any):
    """An in-process server with the guarded protocol in front of a one-route app."""
    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Route

    from runtime.serve.connections import guarded_protocol

    async def ok(request):
        await request.body()
        return Response(b'{"ok":true}', media_type="application/json")

    app = Starlette(routes=[Route("/v1/embeddings", ok, methods=["POST"])])
    return live_server(app, http=guarded_protocol(60, 1000, refused.append, **limits))


def test_head_limits_at_their_boundaries():
    """100 header fields pass and 101 get 431; a head just under --max-head-bytes passes, just over gets 431."""
    refused: list[str] = []
    with _guarded_app_server(refused, max_head_bytes=32768, max_headers=100) as url:
        for extra, status in [(97, b"200"), (98, b"431")]:  # beside Host, Content-Type and Content-Length
            s = connect(url)
            s.sendall(request(b"".join(b"X-H%d: v\r\n" % i for i in range(extra))))
            assert one_response(s).split(b" ")[1] == status
            s.close()
        for size, status in [(32768 - 512, b"200"), (32768 + 512, b"431")]:
            s = connect(url)
            s.sendall(request(b"X-Big: " + b"a" * size + b"\r\n"))
            assert one_response(s).split(b" ")[1] == status
            s.close()
    assert refused == ["head_too_large", "head_too_large"]


class FakeTransport(asyncio.Transport):
    """What the protocol writes, and whether it closed; no socket."""

    def __init__(self) -> None:
        super().__init__()
        self.written = b""
        self.closed = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8080), "peername": ("127.0.0.1", 50000)}.get(name, default)

    def write(self, data: bytes) -> None:
        self.written += data

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def test_a_huge_header_is_refused_after_one_read_past_the_limit():
    """Fed 64 KiB at a time (as the event loop reads), a 90 MiB header is refused on the first read that passes the
    limit, and nothing after it is parsed: the server buffers at most the limit and one read, not 90 MiB."""
    import uvicorn
    from uvicorn.server import ServerState

    from runtime.serve.connections import guarded_protocol

    async def scenario() -> None:
        refused: list[str] = []
        cls = guarded_protocol(60, 1000, refused.append, max_head_bytes=32768, max_headers=100)
        config = uvicorn.Config(lambda scope, receive, send: None, http=cls)
        config.load()
        proto = cls(config=config, server_state=ServerState(), app_state={})
        transport = FakeTransport()
        proto.connection_made(transport)
        proto.data_received(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nX-Big: ")
        reads = 0
        for _ in range(90 * 16):  # 90 MiB in 64 KiB reads, unless refused first
            if transport.closed:
                break
            proto.data_received(b"a" * 65536)
            reads += 1
        assert reads == 1 and transport.closed and transport.written.startswith(b"HTTP/1.1 431")
        assert refused == ["head_too_large"]
        written = transport.written
        proto.data_received(b"a" * 65536 + b"\r\n\r\n")  # what was still in flight is ignored
        assert transport.written == written
        proto.connection_lost(None)

    asyncio.run(scenario())


def test_connection_cap_refuses_new_connections_only(tiny_engine):
    """With --max-connections 8, 12 idle connections beside a client's: the 5 past the cap are closed at once (the
    server's counter says when), the other 7 and the client's own connection stay open and served."""
    with ServerProcess(tiny_engine, "--max-connections", "8", "--head-timeout", "60") as s:
        with httpx.Client(base_url=s.url, timeout=60) as http:
            assert http.post("/v1/embeddings", json={"input": ["connected first"]}).status_code == 200
            idle = [connect(s.url) for _ in range(12)]
            wait_until(lambda: _refused_at_cap(http) == 5, "the 5 connections past the cap closed")
            closed = sum(_closed(c) for c in idle)
            assert closed == 12 - 7  # 7 idle ones fit beside the client's connection; the rest were closed at once
            assert http.post("/v1/embeddings", json={"input": ["still served"]}).status_code == 200  # its connection lives on
            for c in idle:
                c.close()
            assert _refused_at_cap(http) == 5


def _refused_at_cap(http: Any) -> float:
    """The server's count of connections closed at the cap, read over the client's own connection (a new one
    would be past the cap itself)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(http.get("/metrics").text):
        for sample in family.samples:
            if sample.name == "instructor_connections_closed_total" and sample.labels.get("reason") == "max_connections":
                return sample.value
    return 0.0


def test_a_slow_head_holds_no_one_up(tiny_engine):
    """While a client sends its head a byte at a time (no deadline near: --head-timeout 60), other clients are
    answered, and the slow connection is still open and unanswered after they were."""
    with ServerProcess(tiny_engine, "--head-timeout", "60") as s:
        slow = connect(s.url)
        slow.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\n")
        for _ in range(5):
            slow.sendall(b"X")
            normal_request(s.url)
        slow.settimeout(0.1)
        with pytest.raises(socket.timeout):  # nothing was sent back: the head is still open, the connection too
            slow.recv(1)
        slow.close()


def _closed(s: socket.socket) -> bool:
    """Whether the server has closed ``s`` (a FIN or a reset is waiting); an open, silent connection times out."""
    try:
        s.settimeout(0.5)
        return s.recv(1) == b""
    except socket.timeout:
        return False
    except ConnectionResetError:
        return True


def test_ten_thousand_idle_connections_do_not_stall_a_client(tiny_engine):
    wanted = 10_000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < wanted + 512:
        pytest.skip(f"the open-file limit ({hard}) is too low for {wanted} connections")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 2 * wanted + 512)), hard))  # the server inherits it
    with ServerProcess(tiny_engine, "--head-timeout", "600") as s:
        normal_request(s.url)
        base_fds = metric(s.url, "process_open_fds")
        idle = []
        try:
            for _ in range(wanted):
                idle.append(connect(s.url))
            wait_until(lambda: metric(s.url, "process_open_fds") >= base_fds + wanted, "the idle connections accepted", 600)
            with httpx.Client(base_url=s.url, timeout=120) as http:
                assert http.get("/health").status_code == 200
            for _ in range(5):
                normal_request(s.url)  # answered with every idle connection held open beside it
            alive = sum(not _closed(c) for c in idle[:: wanted // 100])
        finally:
            for c in idle:
                c.close()
    assert alive == 100  # the idle connections were held open, not dropped
