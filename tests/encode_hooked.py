"""``python -m tests.encode_hooked ACTION@POINT ARGS...``: ``python -m runtime.encode`` stopped at a named point.

The tests' way to kill the CLI at an exact moment without a hook in production code: ``runtime.encode.main`` takes
an ``on_point`` callable, and this wrapper passes one. ``kill`` sends SIGKILL to this process at POINT (e.g.
``commit:3``, ``save:6``, ``publish``, ``summary``); ``pause`` prints ``PAUSED POINT`` on stderr and waits to be
killed from outside.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

from runtime import encode


def main() -> int:
    action, _, point = sys.argv[1].partition("@")

    def hook(reached: str) -> None:
        if reached != point:
            return
        if action == "pause":
            print(f"PAUSED {point}", file=sys.stderr, flush=True)
            threading.Event().wait()
        os.kill(os.getpid(), signal.SIGKILL)

    return encode.main(sys.argv[2:], on_point=hook)


if __name__ == "__main__":
    sys.exit(main())
