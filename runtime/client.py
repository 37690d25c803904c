"""``runtime.client``: a Python client for ``python -m runtime.serve``, sync (``Client``) and async (``AsyncClient``).

Both have ``encode``, the signature of ``INSTRUCTOR.encode`` (strings, ``[instruction, text]``, ``[instruction, text,
k]`` in any mix; float32 ``[n, dim]`` in input order), plus ``instruction`` / ``instruction_name`` for the plain
strings, so code written for ``runtime.INSTRUCTOR`` runs against a server by changing the constructor. Why each part:

- **Batching under the server's limits.** A large input becomes several requests, each under the server's
  ``--max-request-items`` and ``--payload-limit`` (read once from ``GET /info``; the defaults when the server has
  no ``/info``). An item too large for any request is refused before anything is sent, naming it.
- **base64.** Vectors come as base64 bytes, smaller than JSON floats and exactly the server's bits.
- **Retries.** 429 waits the server's ``Retry-After`` (its queue's estimate), 503 (shutting down, behind a load
  balancer another replica answers), 502/504 and connections that fail before an answer are retried with
  exponential back-off; nothing else is (a 400 is the caller's to fix: its message names the item by its index
  in the whole input). A timeout is the caller's deadline and ends the call.
- **API key** (``Authorization: Bearer``), from ``api_key`` or ``$INSTRUCTOR_API_KEY`` as the server reads it.

httpx is the one dependency beyond the light install (``pip install 'instructor-stack[client]'``); no torch.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import json
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Sequence

import numpy as np
from tqdm.auto import tqdm

from runtime.deps import require
from runtime.output_dtype import storage_dtype
from runtime.tokenization import InputItem

DEFAULT_TIMEOUT = 60.0  # seconds for one request: a full request of long texts on a CPU engine takes a few
DEFAULT_BATCH_SIZE = 128  # items per request: large enough to fill the server's pools, small enough to stream
DEFAULT_MAX_RETRIES = 5
SERVER_DEFAULT_LIMITS = {"max_request_items": 2048, "payload_limit": 2_000_000}  # runtime.serve's defaults
RETRIED_STATUSES = frozenset({429, 502, 503, 504})
MAX_RETRY_WAIT = 60.0  # the server's Retry-After is at most 60 s; a longer one from a proxy is capped here
_ITEM_INDEX = re.compile(r"^(input)\[(\d+)\]")


class ClientError(Exception):
    """The server could not be reached, did not answer in time, or answered with an error (``ServerError``)."""


class ServerError(ClientError):
    """An HTTP error from the server: its status, ``code`` and message (OpenAI's error body)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"HTTP {status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


@dataclass
class Limits:
    """What the client needs to know about the server, from ``GET /info``."""

    max_request_items: int
    payload_limit: int
    embedding_dim: int | None = None


@dataclass
class _Call:
    """One ``encode`` call cut into request bodies."""

    single: bool
    count: int
    bodies: list[tuple[int, int, bytes]] = field(default_factory=list)  # (first item, item count, body)


def _api_key(api_key: str | None) -> str | None:
    return api_key if api_key is not None else os.environ.get("INSTRUCTOR_API_KEY") or None


def _headers(api_key: str | None) -> dict[str, str]:
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


def _item_json(item: InputItem) -> bytes:
    """An item as compact JSON; one holding a lone surrogate is escaped, so the server can name it (else UTF-8)."""
    try:
        return json.dumps(item, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(item, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def plan_requests(
    sentences: str | Sequence[InputItem],
    limits: Limits,
    batch_size: int,
    options: dict[str, Any],
) -> _Call:
    """Cut the inputs into request bodies of at most ``batch_size`` (and the server's) items and ``payload_limit``
    bytes, in input order. ``options`` are the body's other fields (instruction, encoding_format ...)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    single = isinstance(sentences, str)
    items = [sentences] if single else list(sentences)
    rest = json.dumps(options, separators=(",", ":")).encode("utf-8")[1:]  # '"k":v,...}' or '}'
    tail = (b"]," if options else b"]") + rest
    head = b'{"input":['
    room = limits.payload_limit - len(head) - len(tail)
    per_request = min(batch_size, limits.max_request_items)
    call = _Call(single=single, count=len(items))
    start, parts, size = 0, [], 0
    for i, item in enumerate(items):
        encoded = _item_json(item)
        if len(encoded) > room:
            raise ValueError(f"input[{i}] is {len(encoded)} bytes as JSON, over what one request to this server may carry "
                             f"({room} bytes of its payload limit of {limits.payload_limit}, --payload-limit)")
        if parts and (len(parts) == per_request or size + 1 + len(encoded) > room):
            call.bodies.append((start, len(parts), head + b",".join(parts) + tail))
            start, parts, size = i, [], 0
        size += len(encoded) + (1 if parts else 0)
        parts.append(encoded)
    if parts:
        call.bodies.append((start, len(parts), head + b",".join(parts) + tail))
    return call


def decode_vectors(body: Any, count: int, dtype: np.dtype) -> np.ndarray:
    """The rows of an OpenAI embeddings answer with base64 vectors, by their ``index``, as ``dtype``."""
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, list) or len(data) != count:
        raise ClientError(f"the server answered {len(data) if isinstance(data, list) else 'no'} vectors for {count} items")
    rows: list[np.ndarray | None] = [None] * count
    try:
        for entry in data:
            rows[int(entry["index"])] = np.frombuffer(base64.b64decode(entry["embedding"]), dtype=dtype)
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise ClientError(f"the server's answer is not a list of base64 embeddings by index ({type(exc).__name__}: {exc})") from exc
    if any(r is None for r in rows) or len({r.size for r in rows if r is not None}) != 1:
        raise ClientError("the server's answer skipped an index or holds vectors of different lengths")
    return np.vstack(rows)  # type: ignore[arg-type]


def retry_delay(headers: Any, attempt: int, backoff: float) -> float:
    """Seconds to wait before attempt ``attempt + 1``: the server's ``Retry-After`` (seconds or an HTTP date) when it
    sent one, else ``backoff * 2**attempt``; at most ``MAX_RETRY_WAIT``."""
    value = (headers.get("retry-after") or "").strip() if headers is not None else ""
    try:
        return min(max(float(value), 0.0), MAX_RETRY_WAIT)
    except ValueError:
        pass
    try:
        seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
    except (ValueError, TypeError):  # absent or unreadable: back off
        return min(backoff * 2**attempt, MAX_RETRY_WAIT)
    return min(max(seconds, 0.0), MAX_RETRY_WAIT)


def _error(response: Any, start: int) -> ServerError:
    """The server's error; an item index in its message is made an index into the whole input."""
    try:
        err = response.json()["error"]
        code, message = str(err.get("code")), str(err.get("message"))
    except (ValueError, KeyError, TypeError, AttributeError):
        code, message = "http_error", response.text[:300]
    message = _ITEM_INDEX.sub(lambda m: f"{m.group(1)}[{start + int(m.group(2))}]", message)
    return ServerError(response.status_code, code, message)


def _limits(body: Any) -> Limits:
    limits = body.get("limits", {}) if isinstance(body, dict) else {}
    return Limits(
        max_request_items=int(limits.get("max_request_items") or SERVER_DEFAULT_LIMITS["max_request_items"]),
        payload_limit=int(limits.get("payload_limit") or SERVER_DEFAULT_LIMITS["payload_limit"]),
        embedding_dim=body.get("embedding_dim") if isinstance(body, dict) else None,
    )


def _finish(call: _Call, parts: list[np.ndarray], normalize_embeddings: bool, dtype: np.dtype, dim: int | None) -> np.ndarray:
    out = np.vstack(parts) if parts else np.zeros((0, dim or 0), dtype=dtype)
    if normalize_embeddings:
        out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), np.float32(1e-12))
    return out[0] if call.single else out


class _Base:
    def __init__(self, url: str, api_key: str | None, timeout: float, max_retries: int, backoff: float,
                 limits: Limits | None) -> None:
        if max_retries < 0 or timeout <= 0 or backoff < 0:
            raise ValueError("max_retries and backoff must be >= 0 and timeout > 0")
        self.url = url.rstrip("/")
        self.api_key = _api_key(api_key)
        self.timeout = float(timeout)
        self.max_retries = int(max_retries)
        self.backoff = float(backoff)
        self.limits = limits  # None until GET /info has been read (or given, e.g. by another client of the same server)
        self._httpx = require("httpx", "client", "runtime.client")

    def _options(self, instruction: str | None, instruction_name: str | None, embedding_type: str,
                 normalize_embeddings: bool) -> tuple[dict[str, Any], np.dtype]:
        if instruction is not None and instruction_name is not None:
            raise ValueError("give instruction or instruction_name, not both")
        dtype = storage_dtype("float32" if embedding_type == "float" else embedding_type).newbyteorder("<")
        if normalize_embeddings and embedding_type != "float":
            raise ValueError(f"normalize_embeddings applies to float vectors, not embedding_type={embedding_type!r}")
        options: dict[str, Any] = {"encoding_format": "base64"}
        if embedding_type != "float":
            options["embedding_type"] = embedding_type
        if instruction is not None:
            options["instruction"] = instruction
        if instruction_name is not None:
            options["instruction_name"] = instruction_name
        return options, dtype

    def _transport_error(self, exc: Exception) -> ClientError:
        if isinstance(exc, self._httpx.TimeoutException) and not isinstance(exc, self._httpx.ConnectTimeout):
            return ClientError(f"{self.url}: no answer within {self.timeout:g} s (timeout): {type(exc).__name__}")
        return ClientError(f"{self.url}: {type(exc).__name__}: {exc}")

    def _retryable(self, exc: Exception) -> bool:
        """Failures where the request surely never ran (no connection) or the connection dropped before an answer;
        not a read timeout, which is the caller's deadline."""
        h = self._httpx
        return isinstance(exc, (h.ConnectError, h.ConnectTimeout, h.RemoteProtocolError, h.ReadError, h.WriteError))


class Client(_Base):
    """Blocking client: ``Client("http://127.0.0.1:8080").encode([...])``; requests are sent one after another.

    ``timeout`` bounds each request (seconds), ``max_retries`` the retries of one request, ``backoff`` the first
    wait when the server gives no ``Retry-After``. ``sleep`` is how the client waits (tests pass a recorder).
    """

    def __init__(self, url: str, api_key: str | None = None, timeout: float = DEFAULT_TIMEOUT,
                 max_retries: int = DEFAULT_MAX_RETRIES, backoff: float = 0.5, limits: Limits | None = None,
                 sleep: Callable[[float], None] = time.sleep, **httpx_options: Any) -> None:
        super().__init__(url, api_key, timeout, max_retries, backoff, limits)
        self._sleep = sleep
        self._http = self._httpx.Client(base_url=self.url, headers=_headers(self.api_key), timeout=self.timeout, **httpx_options)

    def info(self) -> dict[str, Any]:
        """``GET /info``: the model, its dimension, named instructions, the limits."""
        response = self._send("GET", "/info", None, 0)
        return response.json()

    def health(self) -> bool:
        """Whether ``GET /health`` answers 200 (the engine is loaded and the server is not shutting down)."""
        try:
            return self._http.get("/health").status_code == 200
        except self._httpx.HTTPError:
            return False

    def server_limits(self) -> Limits:
        """The server's limits, read once from ``GET /info`` (its defaults when the server has no ``/info``)."""
        if self.limits is None:
            try:
                self.limits = _limits(self.info())
            except ServerError as exc:
                if exc.status != 404:
                    raise
                self.limits = _limits({})
        return self.limits

    def encode(self, sentences: str | Sequence[InputItem], batch_size: int = DEFAULT_BATCH_SIZE,
               show_progress_bar: bool | None = None, normalize_embeddings: bool = False, *,
               instruction: str | None = None, instruction_name: str | None = None,
               embedding_type: str = "float") -> np.ndarray:
        """Vectors of ``sentences`` (``INSTRUCTOR.encode``'s inputs) from the server, in input order: ``[n, dim]``,
        or ``[dim]`` for one string. ``batch_size`` is items per request; ``instruction`` (text) or
        ``instruction_name`` (the server's ``--instructions``) applies to the plain strings; ``embedding_type``
        asks for compact vectors (float16, int8, uint8, binary, ubinary)."""
        options, dtype = self._options(instruction, instruction_name, embedding_type, normalize_embeddings)
        limits = self.server_limits()
        call = plan_requests(sentences, limits, batch_size, options)
        parts = []
        with tqdm(total=call.count, desc="Encoding", unit="doc", disable=not show_progress_bar) as bar:
            for start, count, body in call.bodies:
                response = self._send("POST", "/v1/embeddings", body, start)
                parts.append(decode_vectors(response.json(), count, dtype))
                bar.update(count)
        return _finish(call, parts, normalize_embeddings, dtype, limits.embedding_dim)

    def _send(self, method: str, path: str, body: bytes | None, start: int) -> Any:
        """One request, retried as the module doc says; the response of a 2xx, else ``ServerError``."""
        attempt = 0
        while True:
            last = attempt == self.max_retries
            try:
                response = self._http.request(method, path, content=body)
            except self._httpx.HTTPError as exc:
                if last or not self._retryable(exc):
                    raise self._transport_error(exc) from exc
                self._sleep(retry_delay(None, attempt, self.backoff))
            else:
                if response.status_code < 300:
                    return response
                if last or response.status_code not in RETRIED_STATUSES:
                    raise _error(response, start)
                self._sleep(retry_delay(response.headers, attempt, self.backoff))
            attempt += 1

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient(_Base):
    """``Client`` for asyncio: ``await AsyncClient(url).encode([...])``; a large input's requests run
    ``max_concurrency`` at a time (the server batches them together). Use it inside one event loop
    (``async with AsyncClient(url) as client``)."""

    def __init__(self, url: str, api_key: str | None = None, timeout: float = DEFAULT_TIMEOUT,
                 max_retries: int = DEFAULT_MAX_RETRIES, backoff: float = 0.5, limits: Limits | None = None,
                 max_concurrency: int = 4, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 **httpx_options: Any) -> None:
        super().__init__(url, api_key, timeout, max_retries, backoff, limits)
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        self.max_concurrency = int(max_concurrency)
        self._sleep = sleep
        self._http = self._httpx.AsyncClient(base_url=self.url, headers=_headers(self.api_key), timeout=self.timeout, **httpx_options)

    async def info(self) -> dict[str, Any]:
        response = await self._send("GET", "/info", None, 0)
        return response.json()

    async def health(self) -> bool:
        try:
            return (await self._http.get("/health")).status_code == 200
        except self._httpx.HTTPError:
            return False

    async def server_limits(self) -> Limits:
        if self.limits is None:
            try:
                self.limits = _limits(await self.info())
            except ServerError as exc:
                if exc.status != 404:
                    raise
                self.limits = _limits({})
        return self.limits

    async def encode(self, sentences: str | Sequence[InputItem], batch_size: int = DEFAULT_BATCH_SIZE,
                     show_progress_bar: bool | None = None, normalize_embeddings: bool = False, *,
                     instruction: str | None = None, instruction_name: str | None = None,
                     embedding_type: str = "float") -> np.ndarray:
        """``Client.encode``, with up to ``max_concurrency`` requests in flight."""
        options, dtype = self._options(instruction, instruction_name, embedding_type, normalize_embeddings)
        limits = await self.server_limits()
        call = plan_requests(sentences, limits, batch_size, options)
        slots = asyncio.Semaphore(self.max_concurrency)
        with tqdm(total=call.count, desc="Encoding", unit="doc", disable=not show_progress_bar) as bar:

            async def one(start: int, count: int, body: bytes) -> np.ndarray:
                async with slots:
                    response = await self._send("POST", "/v1/embeddings", body, start)
                rows = decode_vectors(response.json(), count, dtype)
                bar.update(count)
                return rows

            parts = list(await asyncio.gather(*(one(*b) for b in call.bodies)))
        return _finish(call, parts, normalize_embeddings, dtype, limits.embedding_dim)

    async def _send(self, method: str, path: str, body: bytes | None, start: int) -> Any:
        attempt = 0
        while True:
            last = attempt == self.max_retries
            try:
                response = await self._http.request(method, path, content=body)
            except self._httpx.HTTPError as exc:
                if last or not self._retryable(exc):
                    raise self._transport_error(exc) from exc
                await self._sleep(retry_delay(None, attempt, self.backoff))
            else:
                if response.status_code < 300:
                    return response
                if last or response.status_code not in RETRIED_STATUSES:
                    raise _error(response, start)
                await self._sleep(retry_delay(response.headers, attempt, self.backoff))
            attempt += 1

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
