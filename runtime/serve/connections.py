"""The limits on HTTP connections that uvicorn lacks: a deadline for every request head, and a cap on open connections.

uvicorn closes a connection only after ``timeout_keep_alive`` idle seconds *between* requests. A client that opens
a connection and sends nothing, or sends a request head a byte at a time (slowloris), would hold it for ever, and
enough of them would use up the process's file descriptors. Here every request head (request line and headers) must
be complete within ``head_timeout`` seconds of the connection opening or of the request's first byte; otherwise the
server answers 408 (if anything was sent) and closes the connection. Past ``max_connections`` open connections a
new one is closed at once, so the clients already connected keep being served. Bodies have their own deadline in
the application (``--body-timeout``).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from runtime.serve.errors import error_body

log = logging.getLogger("uvicorn.error")


def guarded_protocol(head_timeout: float, max_connections: int, on_refused: Callable[[str], None]) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol with the head deadline and the connection cap; ``on_refused(reason)`` counts
    each connection closed by them (``reason``: ``head_timeout`` or ``max_connections``)."""

    class GuardedHttpToolsProtocol(HttpToolsProtocol):
        _head_timer: asyncio.TimerHandle | None = None
        _head_bytes = False  # some bytes of the current request head have arrived

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                on_refused("max_connections")
                transport.close()
                return
            self._arm()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._head_bytes = True
            if self._head_timer is None:
                self._arm()

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._head_timer = self.loop.call_later(head_timeout, self._head_timed_out)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None
            self._head_bytes = False

        def _head_timed_out(self) -> None:
            self._head_timer = None
            if self.transport.is_closing():
                return
            on_refused("head_timeout")
            if self._head_bytes:
                body = error_body(408, f"the request head did not arrive within {head_timeout:g} s (--head-timeout)", "request_timeout")
                self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
                                     b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            self.transport.close()

    return GuardedHttpToolsProtocol


def raise_open_file_limit(wanted: int) -> int:
    """Lift the soft open-file limit towards ``wanted`` (each connection is a descriptor); returns the limit now."""
    try:
        import resource
    except ImportError:  # not on this platform: nothing to lift
        return wanted
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-file limit from %d to %d: %s", soft, target, exc)
    return wanted if soft == resource.RLIM_INFINITY else int(soft)


def connection_settings(max_connections: int, reserve: int = 256) -> dict[str, Any]:
    """``max_connections`` fitted to the open-file limit, keeping ``reserve`` descriptors for the engine and logs."""
    limit = raise_open_file_limit(max_connections + reserve)
    fitted = max(1, min(max_connections, limit - reserve))
    if fitted < max_connections:
        log.warning("--max-connections %d lowered to %d: the open-file limit is %d", max_connections, fitted, limit)
    return {"max_connections": fitted, "open_file_limit": limit}
