"""The Starlette application: routes, the life of the engines and their batcher, and what each request goes through.

A request to an embedding endpoint: the body read up to ``payload_limit`` bytes (else 413) within ``body_timeout``
seconds (else 408), a slot among ``max_concurrent_requests`` (else 429), room in the shared queue for about as
many tokens as the body holds (without it, a wait in line of up to ``queue_timeout`` seconds, then 429 with
``Retry-After``), then JSON parsing, validation and tokenization in a small thread pool (never on the event loop),
then the shared batcher, then the response. A client that disconnects while its rows wait has them dropped.
``GET /health`` is 200 only between the warm-up batch at start and the start of shutdown.
"""

from __future__ import annotations

import asyncio
import importlib.metadata as md
import os
import platform
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable, Sequence

import numpy as np
import orjson
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from runtime.backends.onnx import picks_cuda
from runtime.bundle import engine_kind
from runtime.encoder import Encoder
from runtime.serve.batcher import Arrival, Batcher, Job, QueueFull, ShuttingDown
from runtime.serve.config import ServeConfig
from runtime.serve.errors import EXCEPTION_HANDLERS, ApiError, error_response
from runtime.serve.metrics import Metrics
from runtime.serve.middleware import ApiKeyMiddleware, MetricsMiddleware
from runtime.output_dtype import NEEDS_RANGES, load_ranges
from runtime.serve.output import EMBEDDING_TYPES, openai_body, tei_body
from runtime.serve.requests import EmbedRequest, parse_json, parse_openai, parse_tei
from runtime.tokenization import Encoded

Parser = Callable[[Any, dict[str, str], int, int], EmbedRequest]
WARM_UP_INPUT = [["Represent the sentence for warming up: ", "The server is starting."]]
OFF_LOOP_VALUES = 65536  # responses with more values than this are serialized in the thread pool
OPEN_PATHS = frozenset({"/health"})  # no API key needed: load balancers and orchestrators probe it


def engine_devices(config: ServeConfig, cores: int | None = None) -> list[str | None]:
    """One entry per engine: each device of ``--device`` ``--replicas`` times. By default (0), twice for an ONNX
    engine on a CPU of two cores or more, else once: concurrent requests come in small pools, which two engines of
    half the cores run faster than one of all of them (docs/serving.md: 0.90-0.93 of offline docs/s at 64 and 256
    connections of one item, against 0.81-0.84), while a lone one-item request runs on half the cores."""
    names = config.device_names
    if config.replicas:
        return [d for d in names for _ in range(config.replicas)]
    cores = cores or os.cpu_count() or 1
    return [d for d in names for _ in range(2 if cores >= 2 and _onnx_on_cpu(config, d) else 1)]


def _onnx_on_cpu(config: ServeConfig, device: str | None) -> bool:
    """Whether the engine on ``device`` is an ONNX Runtime session on the CPU: the one kind whose threads are set here."""
    return engine_kind(config.engine) == "onnx" and not picks_cuda(device)


def open_encoders(config: ServeConfig) -> list[Encoder]:
    """One engine per entry of ``engine_devices``. Several ONNX engines on the CPU share its cores out (``--threads``
    each, else cores / CPU engines); the thread option goes to those only, so any engine kind opens."""
    if config.threads and engine_kind(config.engine) != "onnx":
        raise ValueError(f"--threads applies to ONNX Runtime engines only, not {config.engine}")
    devices = engine_devices(config)
    on_cpu = [_onnx_on_cpu(config, d) for d in devices]
    threads = config.threads or (max(1, (os.cpu_count() or 1) // sum(on_cpu)) if sum(on_cpu) > 1 else 0)
    encoders: list[Encoder] = []
    try:
        for device, cpu in zip(devices, on_cpu):
            options: dict[str, Any] = {"intra_op_threads": threads} if threads and cpu else {}
            encoders.append(Encoder(config.engine, device=device, max_tokens=config.max_batch_tokens, max_padding=config.max_padding,
                                    long_text=config.long_text, chunk_overlap=config.chunk_overlap,
                                    chunk_pooling=config.chunk_pooling, precision=getattr(config, "precision", "auto"), **options))
    except BaseException:
        for encoder in encoders:
            encoder.close()
        raise
    return encoders


class Service:
    """The engines, their batcher, the tokenizer threads and the metrics of one running server."""

    def __init__(self, config: ServeConfig, opener: Callable[[], Sequence[Encoder]]) -> None:
        self.config = config
        self.opener = opener
        self.metrics = Metrics()
        self.encoders: list[Encoder] = []
        self.encoder: Encoder | None = None  # the first engine: tokenizer, manifest and dimension for every request
        self.batcher: Batcher | None = None
        self.pool = ThreadPoolExecutor(config.tokenization_workers, thread_name_prefix="serve-tokenizer")
        self.state = "loading"  # -> "ready" -> "draining" -> "stopped"
        self.in_flight = 0
        self.ranges: np.ndarray | None = None  # int8/uint8 ranges (--int8-ranges)
        self.tokens_per_byte = 0.0  # of the bodies tokenized so far (moving average): a body's tokens before parsing it
        self.waiting: deque[tuple[int, asyncio.Future[None]]] = deque()  # requests waiting for room, first come first
        self.reserved = 0  # estimated tokens of the requests let in and not yet submitted (being tokenized)
        self.loop: asyncio.AbstractEventLoop | None = None

    # -- life --------------------------------------------------------------------------------------------------------

    async def start(self) -> None:
        loop = self.loop = asyncio.get_running_loop()
        self.encoders = list(await loop.run_in_executor(self.pool, self.opener))
        self.encoder = self.encoders[0]
        c = self.config
        if c.int8_ranges is not None:
            self.ranges = load_ranges(c.int8_ranges, self.encoder.embedding_dim)
        self.batcher = Batcher(self.encoders, self.metrics, c.max_batch_size, self.encoder.max_tokens, c.max_wait_ms,
                               c.max_queue_tokens, on_room=self._room_made)
        warm = await loop.run_in_executor(self.pool, self._tokenize, WARM_UP_INPUT)
        for encoder in self.encoders[1:]:  # the first one is warmed through the batcher
            await loop.run_in_executor(self.pool, encoder.encode_tokenized, warm)
        self.batcher.start()
        await asyncio.wrap_future(self.batcher.submit(warm).future)
        self.state = "ready"

    async def stop(self) -> None:
        """After uvicorn has answered every accepted request: stop the batcher (it drains first) and the engine."""
        self.state = "draining"
        if self.batcher is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.batcher.close)
        for encoder in self.encoders:
            encoder.close()
        self.pool.shutdown(wait=False)
        self.state = "stopped"

    # -- routes ------------------------------------------------------------------------------------------------------

    async def openai_embeddings(self, request: Request) -> Response:
        req, encoded, vectors = await self._embed(request, parse_openai)
        tokens = int(encoded.lengths.sum())
        body = await self._serialize(vectors, openai_body, vectors, req.encoding_format, req.embedding_type, self.ranges,
                                     self.config.served_name, tokens)
        return Response(body, media_type="application/json")

    async def tei_embed(self, request: Request) -> Response:
        req, _, vectors = await self._embed(request, parse_tei)
        if req.normalize and not self._engine_normalizes:
            vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), np.float32(1e-12))
        body = await self._serialize(vectors, tei_body, vectors, req.embedding_type, self.ranges)
        return Response(body, media_type="application/json")

    async def health(self, _request: Request) -> Response:
        if self.state == "ready" and self.batcher is not None and self.batcher.alive:
            return Response(b'{"status":"ok"}', media_type="application/json")
        why = {"loading": "the engine is loading", "draining": "the server is shutting down"}.get(self.state, "the inference thread has stopped")
        return error_response(503, why, "unavailable")

    async def info(self, _request: Request) -> Response:
        assert self.encoder is not None
        manifest = self.encoder.manifest
        body = {
            "model": self.config.served_name,
            "engine": str(self.config.engine),
            "embedding_dim": self.encoder.embedding_dim,
            "max_seq_length": self.encoder.max_seq_length,
            "precision": self.encoder.engine_choice.precision,
            "engine_choice": self.encoder.engine_choice.as_dict(),
            "architecture": manifest.data.get("architecture"),
            "normalized": self._engine_normalizes,
            "long_text": self.encoder.long_text,
            "embedding_types": [t for t in EMBEDDING_TYPES if self.ranges is not None or t not in NEEDS_RANGES],
            "backend": self.encoder.backend.name,
            "device": self.encoder.device,
            "engines": [{"backend": e.backend.name, "device": e.device, "engine": e.engine_choice.name} for e in self.encoders],
            "instruction_rules": manifest.data.get("instruction_rules"),
            "instructions": sorted(self.config.instructions),
            "limits": self.config.limits(),
            "auth": self.config.api_key is not None,
            "versions": _versions(),
        }
        return Response(orjson.dumps(body), media_type="application/json")

    async def models(self, _request: Request) -> Response:
        body = {"object": "list", "data": [{"id": self.config.served_name, "object": "model", "owned_by": "instructor-stack"}]}
        return Response(orjson.dumps(body), media_type="application/json")

    async def metrics_text(self, _request: Request) -> Response:
        text, content_type = self.metrics.render()
        return Response(text, headers={"Content-Type": content_type})

    # -- one embedding request ---------------------------------------------------------------------------------------

    @property
    def _engine_normalizes(self) -> bool:
        return self.encoder is not None and bool(self.encoder.manifest.data.get("normalize", True))

    async def _embed(self, request: Request, parser: Parser) -> tuple[EmbedRequest, Encoded, np.ndarray]:
        if self.batcher is None or self.state != "ready":
            raise ApiError(503, "the server is not ready (loading or shutting down)", "unavailable")
        with self.batcher.arriving() as arrival:
            body = await _read_body(request, self.config.payload_limit, self.config.body_timeout)
            if self.in_flight >= self.config.max_concurrent_requests:
                raise ApiError(429, f"{self.in_flight} requests in progress (limit {self.config.max_concurrent_requests}, "
                               "--max-concurrent-requests); retry later", "too_many_requests", headers={"Retry-After": "1"})
            self.in_flight += 1
            self.metrics.in_progress.set(self.in_flight)
            tokens = int(len(body) * self.tokens_per_byte)  # about as many as the body holds, known before parsing it
            try:
                await self._let_in(request, tokens)
                try:
                    loop = asyncio.get_running_loop()
                    req, encoded, job = await loop.run_in_executor(self.pool, self._prepare, body, parser, arrival)
                finally:
                    self.reserved -= tokens
                    self._let_waiting_in()
            except BaseException:
                self._leave()
                raise
        try:
            return req, encoded, await self._vectors(request, job)
        finally:
            self._leave()

    async def _let_in(self, request: Request, tokens: int) -> None:
        """Return once the queue has room for about ``tokens`` more (reserving them); while it has none, wait in line,
        first come first served and without using the CPU, up to ``--queue-timeout`` seconds, then 429. Waiting
        rather than refusing at once keeps a client that resends every 429 at once from taking the engine's cores."""
        assert self.batcher is not None
        if not self.waiting and self.batcher.room_for(tokens, self.reserved):
            self.reserved += tokens
            return
        if self.config.queue_timeout <= 0:
            raise _queue_full(self.batcher.queue_full())
        entry = (tokens, asyncio.get_running_loop().create_future())
        self.waiting.append(entry)
        self.metrics.waiting.set(len(self.waiting))
        self._let_waiting_in()  # room may have been made since room_for was asked
        gone = asyncio.ensure_future(_disconnect(request))
        try:
            await asyncio.wait((entry[1], gone), timeout=self.config.queue_timeout, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # cancelled (e.g. at shutdown): leave nothing behind in the line or the reservation
            self._leave_line(entry)
            raise
        finally:
            gone.cancel()
        if entry[1].done():  # let in: _let_waiting_in reserved its tokens
            return
        self._leave_line(entry)
        if gone.done() and not gone.cancelled():
            raise ApiError(499, "the client closed the connection while its request waited for room", "client_closed_request")
        raise _queue_full(self.batcher.queue_full())

    def _let_waiting_in(self) -> None:
        """On the event loop: let the waiting requests in, in order, while the queue has room for the first. Called
        after every request's tokenization, so an empty line returns at once (the gauge is set where the line shrinks)."""
        if not self.waiting:
            return
        while self.waiting and self.batcher is not None and self.batcher.room_for(self.waiting[0][0], self.reserved):
            tokens, admitted = self.waiting.popleft()
            self.reserved += tokens
            admitted.set_result(None)
        self.metrics.waiting.set(len(self.waiting))

    def _leave_line(self, entry: tuple[int, asyncio.Future[None]]) -> None:
        """A waiting request gives up: out of the line, or, if it was let in meanwhile, its reservation returned; the
        next in line may fit where this one did not."""
        tokens, admitted = entry
        if admitted.done():
            self.reserved -= tokens
        else:
            admitted.cancel()
            self.waiting.remove(entry)
            self.metrics.waiting.set(len(self.waiting))
        self._let_waiting_in()

    def _room_made(self) -> None:
        """From an engine thread, when tokens leave the queue: let waiting requests in, on the event loop."""
        if self.waiting and self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self._let_waiting_in)

    def _leave(self) -> None:
        self.in_flight -= 1
        self.metrics.in_progress.set(self.in_flight)

    async def _vectors(self, request: Request, job: Job) -> np.ndarray:
        """The job's vectors; if the client disconnects first, its queued rows are dropped (no one reads the answer)."""
        assert self.batcher is not None
        result = asyncio.wrap_future(job.future)
        gone = asyncio.ensure_future(_disconnect(request))
        try:
            await asyncio.wait((result, gone), return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not result.done():
            self.batcher.cancel(job)
            result.cancel()
            raise ApiError(499, "the client closed the connection before its answer was ready", "client_closed_request")
        return result.result()

    def _prepare(self, body: bytes, parser: Parser, arrival: Arrival) -> tuple[EmbedRequest, Encoded, Job]:
        """In a tokenizer thread: JSON, validation, tokenization, and the hand-over to the batcher (from this thread,
        so the inference thread hears of the rows without a detour through the event loop)."""
        assert self.encoder is not None and self.batcher is not None
        req = parser(parse_json(body), self.config.instructions, self.encoder.embedding_dim, self.config.max_request_items)
        if not req.normalize and self._engine_normalizes:
            raise ApiError(400, "normalize=false is not available: this engine L2-normalizes inside its graph", "invalid_value", "normalize")
        if req.embedding_type in NEEDS_RANGES and self.ranges is None:
            raise ApiError(400, f"embedding_type {req.embedding_type!r} needs int8 ranges: start the server with --int8-ranges FILE "
                           "(the corpus run's OUTPUT.ranges.npy, so that queries are quantized as the corpus was)",
                           "invalid_value", "embedding_type")
        encoded = self._tokenize(req.items)
        ratio = float(encoded.lengths.sum()) / max(len(body), 1)
        self.tokens_per_byte = 0.9 * self.tokens_per_byte + 0.1 * ratio if self.tokens_per_byte else ratio
        if not req.truncate and self.encoder.long_text == "truncate" and encoded.truncated.any():
            i = int(np.flatnonzero(encoded.truncated)[0])
            raise ApiError(413, f"inputs[{i}] is longer than the model's max_seq_length of {self.encoder.max_seq_length} tokens "
                           "(send truncate=true to cut it, as the reference does)", "input_too_long", "inputs")
        try:  # the queue limit was applied to this body's estimate when it was let in
            return req, encoded, self.batcher.submit(encoded, arrival, let_in=True)
        except ShuttingDown as exc:
            raise ApiError(503, str(exc), "unavailable") from exc

    def _tokenize(self, items: list[Any]) -> Encoded:
        """Token ids of a request's items: cut at max_seq_length, or whole when long texts are chunked."""
        assert self.encoder is not None
        return self.encoder.tokenizer.encode(items, truncate=self.encoder.long_text == "truncate")

    async def _serialize(self, vectors: np.ndarray, fn: Callable[..., bytes], *args: Any) -> bytes:
        if vectors.size <= OFF_LOOP_VALUES:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)


def _queue_full(exc: QueueFull) -> ApiError:
    return ApiError(429, f"server overloaded: {exc}; retry after {exc.retry_after} s", "queue_full",
                    headers={"Retry-After": str(exc.retry_after)})


async def _read_body(request: Request, limit: int, timeout: float) -> bytes:
    """The body, refused with 413 as soon as it passes ``limit`` bytes (declared or streamed), and with 408 (closing
    the connection) if it has not all arrived ``timeout`` seconds after the headers."""
    declared = request.headers.get("content-length", "")
    too_big = ApiError(413, f"request body over the payload limit of {limit} bytes (--payload-limit)", "payload_too_large")
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks: list[bytes] = []

    async def read() -> None:
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_big
            chunks.append(chunk)

    try:
        await asyncio.wait_for(read(), timeout)
    except ClientDisconnect as exc:  # counted as nginx's 499, not as a server error; no one reads the answer
        raise ApiError(499, "the client closed the connection before sending the whole body", "client_closed_request") from exc
    except asyncio.TimeoutError as exc:
        raise ApiError(408, f"the request body did not arrive within {timeout:g} s (--body-timeout)", "request_timeout",
                       headers={"Connection": "close"}) from exc
    return b"".join(chunks)


async def _disconnect(request: Request) -> None:
    """Returns when the client has disconnected (the ASGI ``http.disconnect`` message, once the body is read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("instructor-stack", "onnxruntime", "tokenizers", "numpy", "starlette", "uvicorn"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            continue
    return out


def create_app(config: ServeConfig, opener: Callable[[], Sequence[Encoder]] | None = None) -> Starlette:
    """The ASGI app; ``opener`` returns the engines (default: ``open_encoders(config)``), called at startup."""
    service = Service(config, opener or (lambda: open_encoders(config)))

    @asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        await service.start()
        yield
        await service.stop()

    routes = [
        Route("/v1/embeddings", service.openai_embeddings, methods=["POST"]),
        Route("/embed", service.tei_embed, methods=["POST"]),
        Route("/v1/models", service.models, methods=["GET"]),
        Route("/health", service.health, methods=["GET"]),
        Route("/info", service.info, methods=["GET"]),
        Route("/metrics", service.metrics_text, methods=["GET"]),
    ]
    middleware = [
        Middleware(MetricsMiddleware, metrics=service.metrics, endpoints=frozenset(r.path for r in routes)),
        Middleware(ApiKeyMiddleware, api_key=config.api_key, open_paths=OPEN_PATHS),
    ]
    app = Starlette(routes=routes, middleware=middleware, exception_handlers=EXCEPTION_HANDLERS, lifespan=lifespan)
    app.state.service = service
    return app
