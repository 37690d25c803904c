"""Helpers for the server tests: a live in-process server on 127.0.0.1, a server subprocess, a gated engine."""

from __future__ import annotations

import contextlib
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

from bench.speed.serve import LocalServer, scrape

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def live_server(app: Any) -> Iterator[str]:
    """Run an ASGI app with uvicorn in a thread on 127.0.0.1; yields its base URL."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(30)


class ServerProcess(LocalServer):
    """``python -m runtime.serve`` as a subprocess on a free port of 127.0.0.1 (``bench.speed.serve.LocalServer``)."""

    def __init__(self, engine: Path, *args: str) -> None:
        port = free_port()
        cmd = [sys.executable, "-m", "runtime.serve", "--engine", str(engine), "--port", str(port), "--log-level", "warning", *args]
        super().__init__(cmd, port)


def metric(url: str, name: str, headers: dict[str, str] | None = None, **labels: str) -> float:
    """One sample of a server's ``/metrics`` (0 when absent)."""
    key = name + ("{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}" if labels else "")
    return scrape(url, headers).get(key, 0.0)


class GatedEncoder:
    """A real ``Encoder`` whose batches wait for ``gate``; ``entered`` is set when a pool reaches the engine, and
    ``fail_next`` (a message) makes the next pool raise ``RuntimeError``."""

    def __init__(self, encoder: Any) -> None:
        self._encoder = encoder
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.pools: list[int] = []  # rows per pool, in order
        self.pool_tokens: list[int] = []  # real tokens per pool, in order
        self.fail_next: str | None = None

    def encode_tokenized(self, encoded: Any, *args: Any, **kwargs: Any) -> Any:
        self.pools.append(len(encoded.ids))
        self.pool_tokens.append(sum(len(ids) for ids in encoded.ids))
        self.entered.set()
        if not self.gate.wait(30):
            raise TimeoutError("gate never opened")
        if self.fail_next:
            message, self.fail_next = self.fail_next, None
            raise RuntimeError(message)
        return self._encoder.encode_tokenized(encoded, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._encoder, name)
