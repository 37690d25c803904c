"""Start-up progress: what the trainer is doing before its first step, and how long each part took.

Loading a large model, validating and indexing the 1.4M-row MEDI file, wrapping the model for several processes
and reading a checkpoint can each take a minute; without a line for each, a run looks hung until its first step.
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Iterator


class Stage:
    """What ``stage`` yields: set ``detail`` to add a few words to its closing line (e.g. the parameter count)."""

    detail: str = ""


@contextmanager
def stage(what: str, enabled: bool = True) -> Iterator[Stage]:
    """``start-up: WHAT ...`` on stderr before the work and ``start-up: WHAT: done in S s`` after (main process only)."""
    if enabled:
        print(f"start-up: {what} ...", file=sys.stderr, flush=True)
    started, info = time.perf_counter(), Stage()
    yield info
    if enabled:
        extra = f" ({info.detail})" if info.detail else ""
        print(f"start-up: {what}: done in {time.perf_counter() - started:.1f} s{extra}", file=sys.stderr, flush=True)
