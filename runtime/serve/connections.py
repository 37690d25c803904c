"""The limits on HTTP connections that uvicorn lacks: a deadline and a size limit for every request head, and a cap on
open connections.

uvicorn closes a connection only after ``timeout_keep_alive`` idle seconds *between* requests. A client that opens
a connection and sends nothing, or sends a request head a byte at a time (slowloris), would hold it for ever, and
enough of them would use up the process's file descriptors. Here every request head (request line and headers) must
be complete within ``head_timeout`` seconds of the connection opening or of the request's first byte; otherwise the
server answers 408 (if anything was sent) and closes the connection. Past ``max_connections`` open connections a
new one is closed at once, so the clients already connected keep being served. Bodies have their own deadline in
the application (``--body-timeout``).

Heads are also held to ``max_head_bytes`` (request line and headers) and ``max_headers`` fields: past either, 431 and
the connection is closed. httptools has no limit of its own and joins a header's pieces as they come, so without one
a single 90 MiB header, sent within the head deadline, grew the server by 180 MiB and held the event loop (another
client's 3 ms request waited 9 s). The bytes of a head still open are counted as they arrive, so at most one read
(256 KiB) past the limit is ever buffered; a head that completes within one read is measured from its parsed line and
fields (as hyper does, whose own check saw only incomplete heads).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from runtime.serve.errors import error_body

log = logging.getLogger("uvicorn.error")


def guarded_protocol(head_timeout: float, max_connections: int, on_refused: Callable[[str], None],
                     max_head_bytes: int = 32768, max_headers: int = 100) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol with the head deadline, the head limits and the connection cap; ``on_refused(reason)``
    counts each connection closed by them (``reason``: ``head_timeout``, ``head_too_large`` or ``max_connections``)."""

    class GuardedHttpToolsProtocol(HttpToolsProtocol):
        _head_timer: asyncio.TimerHandle | None = None
        _head_bytes = False  # some bytes of the current request head have arrived
        _head_open = True  # the bytes arriving belong to a request head
        _head_seen = 0  # bytes that arrived while the head was open
        _head_size = 0  # bytes of the parsed request line and header fields
        _header_count = 0
        _refused = False  # answered 431: nothing more is read

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                on_refused("max_connections")
                transport.close()
                return
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self._refused:
                return
            if self._head_open:
                self._head_seen += len(data)
            super().data_received(data)
            if self._head_open and not self._refused and self._head_seen > max_head_bytes:
                self._refuse(f"the request head passed {max_head_bytes} bytes before it ended (--max-head-bytes)")

        def on_message_begin(self) -> None:
            if self._refused:
                return
            super().on_message_begin()
            self._head_bytes = True
            self._head_size = self._header_count = 0
            if self._head_timer is None:
                self._arm()

        def on_url(self, url: bytes) -> None:
            if not self._refused:
                self._head_size += len(url) + 16  # and the method, the version and the line's spaces and CRLF
                super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            if not self._refused:
                self._head_size += len(name) + len(value) + 4
                self._header_count += 1
                super().on_header(name, value)

        def on_headers_complete(self) -> None:
            if self._refused:
                return
            self._disarm()
            self._head_open = False
            if self._header_count > max_headers:
                self._refuse(f"the request has {self._header_count} header fields, over the limit of {max_headers} (--max-headers)")
            elif self._head_size > max_head_bytes:
                self._refuse(f"the request head is {self._head_size} bytes, over the limit of {max_head_bytes} (--max-head-bytes)")
            else:
                super().on_headers_complete()

        def on_body(self, body: bytes) -> None:
            if not self._refused:
                super().on_body(body)

        def on_message_complete(self) -> None:
            if not self._refused:
                self._head_open, self._head_seen = True, 0  # what comes next is the next request's head
                super().on_message_complete()

        def _refuse(self, message: str) -> None:
            """431 with a JSON error, then close: the rest of this head is never read."""
            self._refused = True
            self._disarm()
            on_refused("head_too_large")
            body = error_body(431, message, "request_header_fields_too_large")
            self.transport.write(b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
                                 b"connection: close\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            self.transport.close()

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
