"""Two plain ASGI middlewares: request counting/timing for Prometheus, and the API key check."""

from __future__ import annotations

import hmac
import time
from typing import Any, Awaitable, Callable

from runtime.serve.errors import error_response
from runtime.serve.metrics import Metrics

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]


class MetricsMiddleware:
    """Counts every HTTP request by endpoint and status and times it; unknown paths count as ``other``."""

    def __init__(self, app: App, metrics: Metrics, endpoints: frozenset[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.endpoints = endpoints

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        endpoint = scope["path"] if scope["path"] in self.endpoints else "other"
        status = 500  # what the client gets if the app raises (the server error handler answers outside)
        started = time.perf_counter()

        async def send_status(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - started)


class ApiKeyMiddleware:
    """``Authorization: Bearer KEY`` on every path except ``open_paths``; the key is compared in constant time."""

    def __init__(self, app: App, api_key: str | None, open_paths: frozenset[str]) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode() if api_key else None
        self.open_paths = open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.expected is None or scope["type"] != "http" or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        given = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        if hmac.compare_digest(given, self.expected):
            await self.app(scope, receive, send)
            return
        message = "missing API key (send Authorization: Bearer KEY)" if not given else "invalid API key"
        response = error_response(401, message, "invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)
