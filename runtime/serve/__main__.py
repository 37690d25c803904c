"""``python -m runtime.serve --engine PATH``: serve an engine bundle over HTTP (OpenAI and text-embeddings-inference APIs).

Endpoints: POST /v1/embeddings (OpenAI), POST /embed (text-embeddings-inference), GET /health, GET /info,
GET /metrics (Prometheus), GET /v1/models. Items are strings, [instruction, text] or [instruction, text, k], as
INSTRUCTOR.encode takes them; engine threads (one per engine: --replicas, or one per device of --device
cuda:0,cuda:1) batch the items of all waiting requests together.

SIGTERM or SIGINT: stop accepting, answer every accepted request, exit 0. The port is taken and the engine opened
before the server listens, so a port in use (3), a bad bundle or option (2) or a missing extra (3) ends the command
at once with one line naming it.
"""

from __future__ import annotations

import argparse
import errno
import importlib.util
import logging
import os
import signal
import socket
import sys
from pathlib import Path

from runtime import exit_codes
from runtime.bundle import EngineError
from runtime.chunking import LONG_TEXT, POOLING
from runtime.deps import MissingDependency, require
from runtime.output_dtype import load_ranges
from runtime.serve.config import ServeConfig, load_instructions

log = logging.getLogger("uvicorn.error")
PROG = "python -m runtime.serve"
# A bad bundle, option or instructions file is configuration (2); a missing extra is the environment (3); OSErrors go
# by errno (port in use, permissions: 3).
KNOWN_ERRORS = {MissingDependency: exit_codes.ENVIRONMENT, EngineError: exit_codes.USAGE, ValueError: exit_codes.USAGE}


def _port(text: str) -> int:
    """``--port``: 0 to 65535 (0: any free port, the one taken is logged)."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is out of range: a port is 0 to 65535 (0: any free port)")
    return port


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    d = ServeConfig(engine=Path("."))
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=exit_codes.EPILOG, allow_abbrev=False)
    p.add_argument("--engine", required=True, type=Path, help="engine bundle to serve (.onnx, .plan, ...: what python -m export wrote)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on; 0.0.0.0 for every interface. Default: 127.0.0.1")
    p.add_argument("--port", type=_port, default=8080,
                   help="0 to 65535; 0 takes any free port and logs it. A port in use ends the command with exit code 3. Default: 8080")
    p.add_argument("--api-key", default=os.environ.get("INSTRUCTOR_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on every endpoint but /health. Default: $INSTRUCTOR_API_KEY, else none")
    p.add_argument("--model-name", default="", help="the model name responses report. Default: the engine file's name without extension")
    p.add_argument("--instructions", type=Path,
                   help='JSON file of named instructions, e.g. {"query": "Represent the question for retrieving supporting documents: "}; '
                   "requests pick one with instruction_name (/v1/embeddings) or prompt_name (/embed)")
    p.add_argument("--max-batch-tokens", type=int, default=d.max_batch_tokens,
                   help="real tokens per engine pool and padded tokens per batch (the planner's budget). "
                   "Default: the engine backend's (16384 on a CPU, more on a GPU)")
    p.add_argument("--max-batch-size", type=int, default=d.max_batch_size, help=f"rows per engine batch. Default: {d.max_batch_size}")
    p.add_argument("--max-wait-ms", type=float, default=d.max_wait_ms,
                   help="longest time a request waits for others to fill its batch; a lone client never waits. "
                   f"Default: {d.max_wait_ms}")
    p.add_argument("--max-padding", type=float, default=d.max_padding,
                   help=f"share of a batch that may be padding before the planner cuts it. Default: {d.max_padding}")
    p.add_argument("--max-queue-tokens", type=int, default=d.max_queue_tokens,
                   help=f"tokens that may wait for the engine; past it requests wait for room (--queue-timeout). Default: {d.max_queue_tokens}")
    p.add_argument("--queue-timeout", type=float, default=d.queue_timeout,
                   help="seconds a request that finds the queue full waits for room, first come first served, before "
                   "429 + Retry-After (0: refuse at once). The wait costs no CPU, so clients that resend a 429 at once "
                   f"cannot take the engine's cores. Default: {d.queue_timeout:g}")
    p.add_argument("--max-concurrent-requests", type=int, default=d.max_concurrent_requests,
                   help=f"embedding requests in progress at once; past it 429 (bounds memory with --payload-limit). Default: {d.max_concurrent_requests}")
    p.add_argument("--max-request-items", type=int, default=d.max_request_items,
                   help=f"items in one request; past it 413. Default: {d.max_request_items}")
    p.add_argument("--payload-limit", type=int, default=d.payload_limit, help=f"request body bytes; past it 413. Default: {d.payload_limit}")
    p.add_argument("--tokenization-workers", type=int, default=d.tokenization_workers,
                   help=f"threads that parse and tokenize requests off the event loop. Default: {d.tokenization_workers}")
    p.add_argument("--threads", type=int, default=0,
                   help="ONNX Runtime intra-op threads per engine (0: one per core, shared out among several CPU engines). Default: 0")
    p.add_argument("--precision", default=d.precision,
                   help="which engine of a --precision auto bundle serves: auto (the fastest that passed its gate on this "
                   "CPU, measured once per machine and thread count), fp32, bf16, int8 or an engine's name; /info says "
                   f"which runs. Default: {d.precision}")
    p.add_argument("--device", default=None,
                   help="cpu, cuda, cuda:N, or a comma-separated list (cuda:0,cuda:1): one engine on each device, all behind "
                   "the one batcher. Default: the engine's natural device")
    p.add_argument("--replicas", type=int, default=d.replicas,
                   help="engines per device, each run by its own thread, all fed by the one queue (on a CPU they share "
                   "the cores out). 0: two for an ONNX engine on a CPU of 2+ cores (more throughput under concurrent "
                   "load; a lone one-item request runs on half the cores: --replicas 1 for the lowest latency of one "
                   f"client), else one. Default: {d.replicas}")
    p.add_argument("--head-timeout", type=float, default=d.head_timeout,
                   help="seconds for a request's line and headers to arrive (from the connection's opening, or the "
                   f"request's first byte); then 408 and the connection is closed. Stops slowloris. Default: {d.head_timeout:g}")
    p.add_argument("--body-timeout", type=float, default=d.body_timeout,
                   help=f"seconds for a request's body to arrive after its headers; then 408 and close. Default: {d.body_timeout:g}")
    p.add_argument("--max-connections", type=int, default=d.max_connections,
                   help="open connections; past it a new one is closed at once and the connected clients go on being "
                   f"served (the open-file limit is raised to fit, or this lowered). Default: {d.max_connections}")
    p.add_argument("--graceful-timeout", type=float, default=None,
                   help="seconds to wait for accepted requests at shutdown before cancelling them. Default: wait until all are answered")
    p.add_argument("--keep-alive-timeout", type=float, default=75.0,
                   help="seconds an idle client connection stays open; longer than clients' own idle expiry (httpx: 5 s), "
                   "so a client never sends on a connection the server is closing. Default: 75")
    p.add_argument("--long-text", choices=LONG_TEXT, default=d.long_text,
                   help="texts over max_seq_length: truncate (as the reference) or chunk (overlapping windows that each "
                   f"repeat the instruction, combined into one vector). Default: {d.long_text}")
    p.add_argument("--chunk-overlap", type=int, default=d.chunk_overlap, help=f"tokens shared by neighbouring chunks. Default: {d.chunk_overlap}")
    p.add_argument("--chunk-pooling", choices=POOLING, default=d.chunk_pooling, help=f"a chunked text's vector from its chunks'. Default: {d.chunk_pooling}")
    p.add_argument("--int8-ranges", type=Path,
                   help="[2, dim] per-dimension ranges (.npy) that embedding_type int8/uint8 quantize with: the corpus "
                   "run's OUTPUT.ranges.npy, so that queries and corpus match. Without it those types are refused")
    p.add_argument("--max-head-bytes", type=int, default=d.max_head_bytes,
                   help="bytes of a request's line and headers; past it 431 and the connection is closed (nginx reads up to "
                   f"4 x 8 KiB, Node.js and h11 16 KiB). Default: {d.max_head_bytes}")
    p.add_argument("--max-headers", type=int, default=d.max_headers,
                   help=f"header fields in a request; past it 431 (hyper, as in text-embeddings-inference, Apache, gunicorn: 100). Default: {d.max_headers}")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"], help="Default: info")
    p.add_argument("--access-log", action="store_true", help="log every request (off by default: it costs throughput)")
    p.add_argument("--debug", action="store_true", help="print the traceback of an internal error (else it goes to a log file)")
    return p.parse_args(argv)


def _stop_now(_sig: int, _frame: object) -> None:
    """SIGTERM/SIGINT outside uvicorn's own handling (while loading, or re-raised by uvicorn after a clean shutdown)."""
    raise SystemExit(0)


def listen_socket(host: str, port: int) -> socket.socket:
    """The server's socket, bound before anything loads: a port in use is an OSError (exit code 3) naming it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        hint = "; another process holds it: pick another --port, or --port 0 for any free one" if exc.errno == errno.EADDRINUSE else ""
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror or exc}{hint}") from exc
    sock.set_inheritable(True)
    return sock


def check_instructions(encoder: object, instructions: dict[str, str], path: Path | None) -> None:
    """Tokenize every named instruction once at start-up, so that one no request can use is a start-up error."""
    for name, instruction in instructions.items():
        try:
            encoder.tokenizer.encode([[instruction, ""]])  # type: ignore[attr-defined]
        except Exception as exc:  # noqa: BLE001 - any tokenizer failure is the file's fault
            raise ValueError(f"{path}: instruction {name!r} cannot be tokenized ({exc})") from exc


def serve(args: argparse.Namespace) -> int:
    uvicorn = require("uvicorn", "serve", PROG)
    require("starlette", "serve", PROG)
    require("httptools", "serve", PROG)
    from runtime.serve.app import create_app, open_encoders
    from runtime.serve.connections import connection_settings, guarded_protocol

    instructions = load_instructions(args.instructions) if args.instructions else {}
    config = ServeConfig(
        engine=args.engine, model_name=args.model_name, api_key=args.api_key or None, instructions=instructions,
        max_batch_tokens=args.max_batch_tokens, max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms,
        max_padding=args.max_padding, max_queue_tokens=args.max_queue_tokens, queue_timeout=args.queue_timeout,
        max_concurrent_requests=args.max_concurrent_requests, max_request_items=args.max_request_items,
        payload_limit=args.payload_limit, tokenization_workers=args.tokenization_workers, threads=args.threads,
        precision=args.precision, device=args.device, replicas=args.replicas, head_timeout=args.head_timeout, body_timeout=args.body_timeout,
        max_connections=args.max_connections, long_text=args.long_text, chunk_overlap=args.chunk_overlap,
        chunk_pooling=args.chunk_pooling, int8_ranges=args.int8_ranges, max_head_bytes=args.max_head_bytes,
        max_headers=args.max_headers,
    )
    signal.signal(signal.SIGTERM, _stop_now)
    signal.signal(signal.SIGINT, _stop_now)
    sock = listen_socket(args.host, args.port)
    try:
        encoders = open_encoders(config)  # before listening: a bad engine is a clear error, not a failed start-up
        encoder = encoders[0]
        if config.int8_ranges is not None:
            load_ranges(config.int8_ranges, encoder.embedding_dim)  # likewise a bad ranges file
        check_instructions(encoder, instructions, args.instructions)
        app = create_app(config, lambda: encoders)
        limits = connection_settings(config.max_connections)
        closed = app.state.service.metrics.connections_closed
        protocol = guarded_protocol(config.head_timeout, limits["max_connections"], lambda reason: closed.labels(reason).inc(),
                                    config.max_head_bytes, config.max_headers)
        port = sock.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(
            app, host=args.host, port=port, log_level=args.log_level, access_log=args.access_log,
            timeout_graceful_shutdown=args.graceful_timeout, timeout_keep_alive=args.keep_alive_timeout, lifespan="on",
            loop="uvloop" if importlib.util.find_spec("uvloop") else "asyncio", http=protocol, backlog=4096,
        ))
        log.info("serving %s (%s, dim %d, %d x %s) on http://%s:%d", config.served_name, encoder.engine_choice.name,
                 encoder.embedding_dim, len(encoders), encoder.backend.name, args.host, port)
        try:
            server.run(sockets=[sock])
        except SystemExit as exc:  # uvicorn's own exit when the app's start-up (engine warm-up) failed
            if exc.code not in (0, None) and not server.started:
                raise RuntimeError("the server did not start: its start-up failed (the error is logged above)") from exc
            raise
    finally:
        sock.close()
    if not server.started:
        raise RuntimeError("the server did not start (the error is logged above)")
    return exit_codes.OK


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return exit_codes.run_cli(lambda: serve(args), prog=PROG, known=KNOWN_ERRORS, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
