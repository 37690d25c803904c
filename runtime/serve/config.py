"""The server's settings in one place: the engine, the limits every request is held to, and named instructions."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from runtime.chunking import DEFAULT_OVERLAP, check_options
from runtime.encoder import DEFAULT_MAX_PADDING
from runtime.tokenization import has_lone_surrogate


@dataclass(frozen=True)
class ServeConfig:
    """What ``python -m runtime.serve`` was started with (see its ``--help`` for why each default is what it is)."""

    engine: Path
    model_name: str = ""  # the ``model`` reported in responses; default: the engine file's stem
    api_key: str | None = None
    instructions: dict[str, str] = field(default_factory=dict)
    max_batch_tokens: int | None = None  # None: the engine backend's default (GPU-sized on CUDA)
    max_batch_size: int = 32
    max_wait_ms: float = 5.0
    max_padding: float = DEFAULT_MAX_PADDING  # the runtime's; see docs/serving.md for what larger values cost
    max_queue_tokens: int = 262144
    queue_timeout: float = 2.0  # seconds a request waits for room in a full queue before its 429
    max_concurrent_requests: int = 512
    max_request_items: int = 2048
    payload_limit: int = 2_000_000
    tokenization_workers: int = 2
    threads: int = 0  # ONNX Runtime intra-op threads per engine, 0: the cores shared out among the CPU engines
    precision: str = "auto"  # which engine of a --precision auto bundle (runtime.cpu_engines)
    device: str | None = None  # one device, or a comma-separated list (cuda:0,cuda:1): one engine on each
    replicas: int = 0  # engines per device, each with its own thread, all behind the one batcher; 0: see engine_devices
    head_timeout: float = 10.0  # seconds for a request's line and headers to arrive
    body_timeout: float = 30.0  # seconds for a request's body to arrive once its headers have
    max_connections: int = 16384  # open connections; past it new ones are closed at once
    max_head_bytes: int = 32768  # a request's line and headers; past it 431 (nginx: 4 x 8 KiB)
    max_headers: int = 100  # header fields in a request; past it 431 (hyper, Apache, gunicorn)
    long_text: str = "truncate"  # or "chunk": see runtime.chunking
    chunk_overlap: int = DEFAULT_OVERLAP
    chunk_pooling: str = "mean"
    int8_ranges: Path | None = None  # [2, dim] ranges for embedding_type int8/uint8 (e.g. the corpus run's OUTPUT.ranges.npy)

    def __post_init__(self) -> None:
        positive = ("max_batch_tokens", "max_batch_size", "max_queue_tokens", "max_concurrent_requests",
                    "max_request_items", "payload_limit", "tokenization_workers", "max_connections", "max_head_bytes",
                    "max_headers")
        for name in positive:
            value = getattr(self, name)
            if value is not None and int(value) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be >= 1, got {value}")
        check_options(self.long_text, self.chunk_overlap, self.chunk_pooling)
        if self.max_wait_ms < 0 or self.threads < 0 or self.queue_timeout < 0 or self.replicas < 0:
            raise ValueError("max-wait-ms, queue-timeout, threads and replicas must be >= 0")
        if self.head_timeout <= 0 or self.body_timeout <= 0:
            raise ValueError("head-timeout and body-timeout must be > 0")
        if self.device is not None and not all(self.device_names):
            raise ValueError(f"device: an empty name in {self.device!r} (expected e.g. cpu, cuda:0 or cuda:0,cuda:1)")
        if not 0.0 <= self.max_padding < 1.0:
            raise ValueError(f"max-padding must be in [0, 1), got {self.max_padding}")

    @property
    def device_names(self) -> list[str | None]:
        """The devices of ``--device`` (``[None]``: the engine's natural device)."""
        return [d.strip() for d in self.device.split(",")] if self.device is not None else [None]

    @property
    def served_name(self) -> str:
        return self.model_name or Path(self.engine).stem

    def limits(self) -> dict[str, float | int]:
        """The limits as ``GET /info`` reports them."""
        return {
            "max_batch_tokens": self.max_batch_tokens,
            "max_batch_size": self.max_batch_size,
            "max_wait_ms": self.max_wait_ms,
            "max_padding": self.max_padding,
            "max_queue_tokens": self.max_queue_tokens,
            "queue_timeout": self.queue_timeout,
            "max_concurrent_requests": self.max_concurrent_requests,
            "max_request_items": self.max_request_items,
            "payload_limit": self.payload_limit,
            "tokenization_workers": self.tokenization_workers,
            "head_timeout": self.head_timeout,
            "body_timeout": self.body_timeout,
            "max_connections": self.max_connections,
            "max_head_bytes": self.max_head_bytes,
            "max_headers": self.max_headers,
        }


def load_instructions(path: str | Path) -> dict[str, str]:
    """``--instructions FILE.json``: a JSON object of name -> instruction string; errors name the file and key."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"{path}: cannot read the instructions file ({exc.strerror or exc})") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict) or not data:
        raise ValueError(f"{path}: expected a non-empty JSON object of name -> instruction string")
    for name, value in data.items():
        shown = ascii(name) if has_lone_surrogate(name) else repr(name)
        if not isinstance(value, str):
            raise ValueError(f"{path}: instruction {shown} must be a string, got {type(value).__name__}")
        if has_lone_surrogate(name) or has_lone_surrogate(value):  # "\ud800" in JSON: no tokenizer takes it
            where = "its name" if has_lone_surrogate(name) else "its text"
            raise ValueError(f"{path}: instruction {shown}: {where} is invalid unicode (a lone surrogate, e.g. \\ud800)")
    return dict(data)
