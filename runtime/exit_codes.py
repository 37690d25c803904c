"""One exit-code contract for every command: what a script or scheduler can rely on after a run.

0 done; 1 bad input data; 2 bad usage or configuration; 3 the environment (port, GPU, disk, permissions, another run
holding the output, a missing optional package); 4 an internal error (a short message; the traceback goes to a log
file, or to stderr under ``--debug``); 130 interrupted. ``run_cli`` applies it around a command's body, so that no
command ends in a bare traceback.
"""

from __future__ import annotations

import errno
import os
import sys
import tempfile
import time
import traceback
from typing import Callable, Mapping

OK = 0
INPUT = 1
USAGE = 2
ENVIRONMENT = 3
INTERNAL = 4
INTERRUPTED = 130

EPILOG = (
    "exit codes: 0 done; 1 bad input data (the message names file, line and field); 2 bad usage or configuration; "
    "3 the environment (port in use, no GPU, disk full, permissions, another run holding the output, a missing "
    "optional package); 4 internal error (a one-line message; the traceback is written to a log file, or to stderr "
    "with --debug); 130 interrupted"
)

# OSErrors that say the machine is in the way, not the user's command or data.
_ENVIRONMENT_ERRNOS = {
    errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EADDRINUSE, errno.EADDRNOTAVAIL,
    errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EIO, errno.EBUSY, errno.ETXTBSY,
}


def os_error_message(exc: OSError, hint: str = "") -> str:
    """One line for a disk, permission or path problem: the path, the reason, the errno and what to do next."""
    where = f"{exc.filename}: " if exc.filename else ""
    tail = f"; {hint}" if hint else ""
    return f"{where}{exc.strerror or exc} (errno {exc.errno}){tail}"


def classify(exc: BaseException, known: Mapping[type[BaseException], int]) -> int:
    """The exit code of ``exc``: the first matching class of ``known`` (most specific first), then OSErrors by errno."""
    for kind, code in known.items():
        if isinstance(exc, kind):
            return code
    if isinstance(exc, OSError):
        return ENVIRONMENT if exc.errno in _ENVIRONMENT_ERRNOS else USAGE
    return INTERNAL


def _log_traceback(prog: str, exc: BaseException) -> str | None:
    """The traceback in a log file under the temp folder; its path, or None when even that cannot be written."""
    try:
        fd, path = tempfile.mkstemp(prefix=f"{prog.replace(' ', '-')}-{time.strftime('%Y%m%d-%H%M%S')}-", suffix=".log")
        with os.fdopen(fd, "w") as f:
            f.write(f"{prog} {' '.join(sys.argv[1:])}\n")
            traceback.print_exception(type(exc), exc, exc.__traceback__, file=f)
        return path
    except OSError:
        return None


def run_cli(
    body: Callable[[], int],
    *,
    prog: str,
    known: Mapping[type[BaseException], int],
    debug: bool = False,
    os_hint: str = "",
    on_interrupt: str = "interrupted",
) -> int:
    """``body()``, with every exception turned into one ``error: ...`` line on stderr and its exit code."""
    try:
        return body()
    except KeyboardInterrupt:
        print(on_interrupt, file=sys.stderr)
        return INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - the one place a command's failures become exit codes
        code = classify(exc, known)
        if debug:
            traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
        if code == INTERNAL:
            where = "" if debug else _log_traceback(prog, exc)
            more = f"; traceback in {where}" if where else ("" if debug else "; run again with --debug for the traceback")
            print(f"internal error: {type(exc).__name__}: {exc}{more}", file=sys.stderr)
        elif isinstance(exc, OSError) and not _matches(exc, known):
            print(f"error: {os_error_message(exc, os_hint)}", file=sys.stderr)
        else:
            print(f"error: {exc}", file=sys.stderr)
        return code


def _matches(exc: BaseException, known: Mapping[type[BaseException], int]) -> bool:
    return any(isinstance(exc, kind) for kind in known)
