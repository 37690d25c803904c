"""Helpers for the server tests: a live in-process server on 127.0.0.1, a server subprocess, a gated engine, a clock.

No helper picks a port and hands it on: a port found free and then given to a server can be taken in between by any
other process (parallel test runs open thousands of connections, each on an ephemeral port). The in-process server
gets a socket already bound to port 0; the subprocess is started with ``--port 0`` and its port is read from /proc.
"""

from __future__ import annotations

import contextlib
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from bench.speed.serve import LocalServer, scrape

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A port nothing listened on a moment ago: for a URL that should refuse connections, never to start a server on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def live_server(app: Any, **config: Any) -> Iterator[str]:
    """Run an ASGI app with uvicorn in a thread on 127.0.0.1 (on a socket bound here, to a port the kernel picks);
    yields its base URL. ``config``: more ``uvicorn.Config`` settings (e.g. ``http=`` a protocol class)."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    settings = {"log_level": "warning", "lifespan": "on", **config}
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, **settings))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


class ServerProcess(LocalServer):
    """``python -m runtime.serve --port 0`` as a subprocess on 127.0.0.1 (``bench.speed.serve.LocalServer`` reads the
    port it took)."""

    def __init__(self, engine: Path, *args: str) -> None:
        cmd = [sys.executable, "-m", "runtime.serve", "--engine", str(engine), "--port", "0", "--log-level", "warning", *args]
        super().__init__(cmd, 0)


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 120.0) -> None:
    """Poll ``condition`` until it holds. A synchronization, not a measurement: the timeout only turns a state that
    never comes (a bug) into a failure naming it, and is far above any machine load."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not reached in {timeout:.0f} s")
        time.sleep(0.01)


def metric(url: str, name: str, headers: dict[str, str] | None = None, **labels: str) -> float:
    """One sample of a server's ``/metrics`` (0 when absent)."""
    key = name + ("{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}" if labels else "")
    return scrape(url, headers).get(key, 0.0)


class Gate:
    """Open, pools pass; closed, each waits, except the ``allow(n)`` next ones. Tests build the order they assert
    with it instead of hoping a thread is slow or fast."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._open = True
        self._permits = 0

    def set(self) -> None:
        with self._cond:
            self._open = True
            self._cond.notify_all()

    def clear(self) -> None:
        with self._cond:
            self._open = False

    def is_set(self) -> bool:
        return self._open

    def allow(self, pools: int) -> None:
        """Let the next ``pools`` pools through a closed gate."""
        with self._cond:
            self._permits += pools
            self._cond.notify_all()

    def wait(self, timeout: float) -> bool:
        with self._cond:
            if not self._cond.wait_for(lambda: self._open or self._permits > 0, timeout):
                return False
            if not self._open:
                self._permits -= 1
            return True


class GatedEncoder:
    """A real ``Encoder`` whose pools wait at ``gate`` (a ``Gate``); ``entered`` is set when a pool reaches the engine,
    ``pools``/``pool_tokens``/``pool_ids`` record each pool in order, and ``fail_next`` (a message) makes the next
    pool raise ``RuntimeError``."""

    def __init__(self, encoder: Any) -> None:
        self._encoder = encoder
        self.gate = Gate()
        self.entered = threading.Event()
        self.pools: list[int] = []  # rows per pool, in order
        self.pool_tokens: list[int] = []  # real tokens per pool, in order
        self.pool_ids: list[list[list[int]]] = []  # the token ids of each pool's rows, in order
        self.fail_next: str | None = None

    def encode_tokenized(self, encoded: Any, *args: Any, **kwargs: Any) -> Any:
        self.pool_ids.append([list(ids) for ids in encoded.ids])
        self.pool_tokens.append(sum(len(ids) for ids in encoded.ids))
        self.pools.append(len(encoded.ids))
        self.entered.set()
        if not self.gate.wait(120):
            raise TimeoutError("gate never opened")
        if self.fail_next:
            message, self.fail_next = self.fail_next, None
            raise RuntimeError(message)
        return self._encoder.encode_tokenized(encoded, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._encoder, name)


class FakeClock:
    """A clock that moves only when told (``advance``); ``reads`` counts the times it was read, so a test can wait
    until a thread has looked at it (is waiting on it)."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self.reads = 0

    def __call__(self) -> float:
        self.reads += 1
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
