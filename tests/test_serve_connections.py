"""Slow and idle clients against ``python -m runtime.serve``: head and body deadlines, the connection cap, and
10,000 idle connections while a normal client is served."""

from __future__ import annotations

import json
import resource
import socket
import time

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
pytest.importorskip("httptools")

from tests.serve_support import ServerProcess, metric  # noqa: E402

BODY = json.dumps({"input": ["a normal request"]}).encode()


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    s = socket.create_connection((host, int(port)), timeout=10)
    return s


def read_all(s: socket.socket, timeout: float) -> bytes:
    """Everything the server sends until it closes the connection (or ``timeout`` passes)."""
    s.settimeout(timeout)
    data = b""
    try:
        while chunk := s.recv(65536):
            data += chunk
    except (socket.timeout, ConnectionResetError):
        pass
    return data


def normal_request_ms(url: str) -> float:
    t0 = time.perf_counter()
    r = httpx.post(f"{url}/v1/embeddings", json={"input": ["a normal request"]}, timeout=10)
    assert r.status_code == 200 and len(r.json()["data"]) == 1
    return (time.perf_counter() - t0) * 1000


@pytest.fixture(scope="module")
def server(tiny_engine):
    with ServerProcess(tiny_engine, "--head-timeout", "1", "--body-timeout", "1") as s:
        yield s.url


def test_slowloris_head_gets_408_and_is_closed(server):
    """A head sent a byte at a time is cut off at --head-timeout with a JSON 408; others are served meanwhile."""
    s = connect(server)
    s.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\n")
    t0 = time.monotonic()
    served = []
    answer = b""
    s.settimeout(0.2)
    while time.monotonic() - t0 < 5:
        try:
            s.sendall(b"X")  # one byte of a header that never ends
            chunk = s.recv(65536)
            if not chunk:
                break
            answer += chunk
        except socket.timeout:
            served.append(normal_request_ms(server))
        except (BrokenPipeError, ConnectionResetError):
            break
    took = time.monotonic() - t0
    s.close()
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_timeout"
    assert 0.8 < took < 3
    assert served and max(served) < 1000  # the slow client did not hold anyone up
    assert metric(server, "instructor_connections_closed_total", reason="head_timeout") >= 1


def test_silent_connection_is_closed_without_an_answer(server):
    s = connect(server)
    t0 = time.monotonic()
    data = read_all(s, 5)
    assert data == b"" and 0.8 < time.monotonic() - t0 < 3
    s.close()


def test_body_that_never_finishes_gets_408(server):
    s = connect(server)
    s.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"input\":")
    t0 = time.monotonic()
    data = read_all(s, 5)
    s.close()
    assert data.startswith(b"HTTP/1.1 408"), data[:200]
    assert b'"request_timeout"' in data and b"--body-timeout" in data
    assert 0.8 < time.monotonic() - t0 < 3


def test_keep_alive_connection_serves_several_requests_within_the_deadline(server):
    """The head deadline is per request: a connection used for several quick requests is not cut."""
    with httpx.Client(base_url=server, timeout=10) as http:
        for _ in range(4):
            assert http.post("/v1/embeddings", json={"input": ["again"]}).status_code == 200
            time.sleep(0.4)  # 1.6 s on one connection, past the 1 s head deadline in all


def test_connection_cap_refuses_new_connections_only(tiny_engine):
    with ServerProcess(tiny_engine, "--max-connections", "8", "--head-timeout", "30") as s:
        with httpx.Client(base_url=s.url, timeout=10) as http:
            assert http.post("/v1/embeddings", json={"input": ["connected first"]}).status_code == 200
            idle = [connect(s.url) for _ in range(12)]
            time.sleep(0.3)
            closed = sum(read_all(c, 0.2) == b"" and _closed(c) for c in idle)
            assert closed == 12 - 7  # 7 idle ones fit beside the client's connection; the rest were closed at once
            assert http.post("/v1/embeddings", json={"input": ["still served"]}).status_code == 200  # its connection lives on
            for c in idle:
                c.close()
            assert metric(s.url, "instructor_connections_closed_total", reason="max_connections") == 5


def _closed(s: socket.socket) -> bool:
    try:
        s.settimeout(0.1)
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
    with ServerProcess(tiny_engine, "--head-timeout", "60") as s:
        before = normal_request_ms(s.url)
        idle = []
        try:
            for _ in range(wanted):
                idle.append(connect(s.url))
            time.sleep(1)
            with httpx.Client(base_url=s.url, timeout=10) as http:
                r = http.get("/health")
                assert r.status_code == 200
            during = [normal_request_ms(s.url) for _ in range(5)]
            alive = sum(not _closed(c) for c in idle[:: wanted // 100])
        finally:
            for c in idle:
                c.close()
    assert alive == 100  # the idle connections were held open, not dropped
    assert max(during) < max(1000, 20 * before)  # and the normal client was answered at once
