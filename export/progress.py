"""Progress of an export on stderr: one line when a step starts and one when it ends, with the time since the export
began and the step's own time, so that an export of many minutes (int8 sensitivity, TensorRT, AOTInductor) is never
silent and its log says where the time went."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Iterator, TextIO


class Progress:
    """``with progress.step("ONNX export"): ...`` prints ``export [  12.3 s] ONNX export ...`` and, at the end,
    ``export [  15.0 s] ONNX export: 2.7 s``; ``note`` prints one line. ``enabled=False`` (``--quiet``) prints nothing."""

    def __init__(self, enabled: bool = True, stream: TextIO | None = None) -> None:
        self.enabled = enabled
        self.stream = stream
        self.start = time.monotonic()

    def note(self, message: str) -> None:
        if self.enabled:
            print(f"export [{time.monotonic() - self.start:7.1f} s] {message}", file=self.stream or sys.stderr, flush=True)

    @contextmanager
    def step(self, what: str) -> Iterator[None]:
        self.note(f"{what} ...")
        t0 = time.monotonic()
        yield
        self.note(f"{what}: {time.monotonic() - t0:.1f} s")
