"""Prometheus metrics of one server (its own registry, so that several apps in one process never share counts)."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest

SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


def peak_rss_bytes(pid: int | str = "self") -> float:
    """Peak resident memory of a process (Linux ``VmHWM``); 0 where /proc is not there.

    Not ``getrusage``: its ``ru_maxrss`` survives ``exec``, so a server started from a big parent reports the parent's.
    """
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return float(int(line.split()[1]) * 1024)
    except (OSError, ValueError):
        pass
    return 0.0


class Metrics:
    """Requests by endpoint and status, items, tokens, padded tokens, batch sizes, queue depth and the times."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("instructor_requests", "HTTP requests by endpoint and status code", ["endpoint", "status"], registry=r)
        self.latency = Histogram("instructor_request_duration_seconds", "End-to-end time of a request in the server", ["endpoint"], buckets=SECONDS, registry=r)
        self.items = Counter("instructor_items", "Items (texts) embedded", registry=r)
        self.tokens = Counter("instructor_tokens", "Real tokens embedded (instruction, text and special tokens)", registry=r)
        self.connections_closed = Counter("instructor_connections_closed", "Connections the server closed: reason head_timeout "
                                          "(--head-timeout) or max_connections (--max-connections)", ["reason"], registry=r)
        self.cancelled_items = Counter("instructor_cancelled_items", "Queued items dropped because their client disconnected", registry=r)
        self.padded_tokens = Counter("instructor_padded_tokens", "Positions the engine computed (per batch: rows x its padded width)", registry=r)
        self.batch_size = Histogram("instructor_batch_size", "Rows per engine batch", buckets=ROWS, registry=r)
        self.inference = Histogram("instructor_inference_seconds", "Engine time per batch (one encode_tokenized call)", buckets=SECONDS, registry=r)
        self.queue_time = Histogram("instructor_queue_seconds", "Time from a request's enqueue to its first batch", buckets=SECONDS, registry=r)
        self.in_progress = Gauge("instructor_requests_in_progress", "Embedding requests being read, tokenized, queued or run", registry=r)
        self.waiting = Gauge("instructor_requests_waiting", "Requests waiting for room in a full queue (--queue-timeout)", registry=r)
        self.queue_items = Gauge("instructor_queue_items", "Items waiting for the engine", registry=r)
        self.queue_tokens = Gauge("instructor_queue_tokens", "Tokens waiting for the engine (compared with --max-queue-tokens)", registry=r)
        Gauge("instructor_peak_rss_bytes", "Peak resident memory of the server process", registry=r).set_function(peak_rss_bytes)
        ProcessCollector(registry=r)

    def render(self) -> tuple[bytes, str]:
        """The text exposition format and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
