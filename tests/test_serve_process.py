"""``python -m runtime.serve`` as a real process on 127.0.0.1: command line, SIGTERM during a burst, bounded load test."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

from bench.speed.serve import scrape  # noqa: E402
from tests.serve_support import ROOT, ServerProcess, metric, wait_until  # noqa: E402


def serve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "runtime.serve", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env=env)


def test_help_and_bad_arguments(tmp_path, tiny_engine):
    out = serve("--help")
    assert out.returncode == 0 and "/v1/embeddings" in out.stdout and "--max-queue-tokens" in out.stdout
    assert "exit codes: 0 done" in out.stdout and "--max-head-bytes" in out.stdout and "--debug" in out.stdout
    missing = serve("--engine", str(tmp_path / "none.onnx"), "--port", "0")
    assert missing.returncode == 2 and "none.onnx: engine file not found" in missing.stderr
    (tmp_path / "bad.json").write_text('{"q": 1}')
    bad = serve("--engine", str(tiny_engine), "--port", "0", "--instructions", str(tmp_path / "bad.json"))
    assert bad.returncode == 2 and "bad.json: instruction 'q' must be a string" in bad.stderr


def test_exit_codes(tmp_path, tiny_engine):
    """Port out of range: 2 (it listened on a random port before); port in use: 3; an abbreviated option: 2 (no
    longer taken for the long one); a named instruction with a lone surrogate: 2 at start-up, naming file and name
    (it passed start-up and made every use a 500); a missing extra: 3. No traceback in any."""
    lone = tmp_path / "lone.json"
    lone.write_text('{"query": "Represent the question: \\ud800"}')
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        in_use = serve("--engine", str(tiny_engine), "--port", str(port))
    code = ("import sys; sys.modules['uvicorn'] = None; from runtime.serve.__main__ import main; "
            f"sys.exit(main(['--engine', {str(tiny_engine)!r}, '--port', '0']))")
    cases = [
        (serve("--engine", str(tiny_engine), "--port", "99999"), 2, "--port: 99999 is out of range: a port is 0 to 65535"),
        (in_use, 3, f"error: cannot listen on 127.0.0.1:{port}: Address already in use"),
        (serve("--engine", str(tiny_engine), "--port", "0", "--max-batch", "4"), 2, "unrecognized arguments: --max-batch 4"),
        (serve("--engine", str(tiny_engine), "--port", "0", "--instructions", str(lone)), 2,
         "lone.json: instruction 'query': its text is invalid unicode"),
        (subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120), 3,
         "pip install 'instructor-stack[serve]'"),
    ]
    for out, code, words in cases:
        assert out.returncode == code and words in out.stderr, (code, out.stderr[-500:])
        assert "Traceback" not in out.stderr


def test_sigterm_during_a_burst_answers_every_accepted_request(tiny_engine, golden_inputs, golden_vectors):
    """16 requests of 64 items are accepted; SIGTERM arrives while they run: all 16 answered right, then exit 0."""
    n_requests, n_items = 16, 64
    idx = [np.arange(k, k + n_items) % len(golden_inputs) for k in range(n_requests)]
    results: list[tuple[int, httpx.Response | Exception, float]] = []

    def post(k: int) -> None:
        try:
            r = httpx.post(f"{server.url}/v1/embeddings", json={"input": [golden_inputs[i] for i in idx[k]], "encoding_format": "float"}, timeout=120)
        except httpx.HTTPError as exc:
            r = exc
        results.append((k, r, time.monotonic()))

    with ServerProcess(tiny_engine, "--max-batch-size", "1") as server:  # one row per engine call: the burst takes a while
        threads = [threading.Thread(target=post, args=(k,)) for k in range(n_requests)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while True:  # every request accepted (in progress or already answered), some still queued
            m = scrape(server.url)
            seen = m["instructor_requests_in_progress"] + m.get('instructor_requests_total{endpoint="/v1/embeddings",status="200"}', 0)
            if seen >= n_requests and m["instructor_queue_items"] > 0:
                break
            assert time.monotonic() < deadline, f"the burst never arrived whole ({seen} of {n_requests} requests seen)"
            time.sleep(0.01)
        signalled = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: _refused(server.url), "new connections refused after SIGTERM")  # no longer accepting
        for t in threads:
            t.join(120)
        assert server.proc.wait(60) == 0
    assert len(results) == n_requests
    for k, r, _ in results:
        assert isinstance(r, httpx.Response) and r.status_code == 200, r
        got = np.array([d["embedding"] for d in r.json()["data"]], dtype=np.float32)
        np.testing.assert_allclose(got, golden_vectors[idx[k]], atol=1e-5)
    assert max(done for _, _, done in results) > signalled  # the server really was busy when the signal came


def _refused(url: str) -> bool:
    """Whether a new connection is refused (a bare connect: no request is sent, so none is accepted by the probe)."""
    host, port = url.removeprefix("http://").split(":")
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except ConnectionRefusedError:
        return True
    return False


LOAD_SECONDS = 20.0
LOAD_CLIENTS = 64
LOAD_MAX_REQUESTS = 100_000  # a second bound, never expected to be reached


@pytest.mark.load
def test_load_64_clients_no_5xx_no_lost_request(tiny_engine, golden_inputs, golden_vectors):
    """64 closed-loop clients on 127.0.0.1 for 20 s (one of them sending 1,000-item requests): every request is
    answered, none with a 5xx, every vector right; the server's request counter agrees; then a clean exit."""
    counts = {"sent": 0, "answered": 0, "5xx": 0, "errors": 0, "wrong": 0}
    statuses: dict[int, int] = {}
    errors: list[str] = []
    rng = np.random.default_rng(0)

    async def client(k: int, http: httpx.AsyncClient, stop_at: float) -> None:
        while time.monotonic() < stop_at and counts["sent"] < LOAD_MAX_REQUESTS:
            size = 1000 if k == 0 else int(rng.integers(1, 9))
            idx = rng.integers(0, len(golden_inputs), size=size)
            counts["sent"] += 1
            try:
                r = await http.post("/v1/embeddings", json={"input": [golden_inputs[i] for i in idx], "encoding_format": "float"})
            except httpx.HTTPError as exc:
                counts["errors"] += 1
                errors.append(f"{type(exc).__name__}: {exc} after {time.monotonic() - stop_at + LOAD_SECONDS:.1f} s")
                continue
            counts["answered"] += 1
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            counts["5xx"] += r.status_code >= 500
            if r.status_code == 200:
                got = np.array([d["embedding"] for d in r.json()["data"]], dtype=np.float32)
                counts["wrong"] += not np.allclose(got, golden_vectors[idx], atol=1e-5)

    async def run(url: str) -> None:
        limits = httpx.Limits(max_connections=LOAD_CLIENTS, max_keepalive_connections=LOAD_CLIENTS)
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as http:
            stop_at = time.monotonic() + LOAD_SECONDS
            await asyncio.gather(*(client(k, http, stop_at) for k in range(LOAD_CLIENTS)))

    with ServerProcess(tiny_engine) as server:
        started = time.monotonic()
        asyncio.run(run(server.url))
        elapsed = time.monotonic() - started
        served = metric(server.url, "instructor_requests_total", endpoint="/v1/embeddings", status="200")
        peak_rss = metric(server.url, "instructor_peak_rss_bytes")
        assert server.stop() == 0
    print(f"\nload test: {LOAD_CLIENTS} clients, {elapsed:.1f} s: sent {counts['sent']}, answered {counts['answered']}, "
          f"statuses {statuses}, 5xx {counts['5xx']}, transport errors {counts['errors']}, wrong vectors {counts['wrong']}, "
          f"server peak RSS {peak_rss / 2**20:.0f} MiB; errors: {errors[:5]}")
    assert counts["sent"] > LOAD_CLIENTS and counts["answered"] == counts["sent"] and counts["errors"] == 0
    assert counts["5xx"] == 0 and statuses.get(200, 0) == counts["sent"] and counts["wrong"] == 0
    assert served == counts["sent"]
    assert elapsed < LOAD_SECONDS + 60
