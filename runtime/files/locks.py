"""Exclusive ownership of an output or a work folder between processes, and cleanup of what dead owners left.

A lock is ``fcntl.flock`` on a small file that also holds the owner's pid and start time (for the message a second
process gets). The kernel releases a flock when its process dies, kill -9 included, so a lock can never be held by
a dead process and needs no staleness rule. Temp folders are owned the same way: ``owned_temp_dir`` holds a lock
inside the folder for as long as it is in use, and removes earlier siblings whose lock it can take (their owner
is dead).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

OWNER_FILE = ".owner.lock"
FRESH_S = 10.0


class LockHeld(RuntimeError):
    """Another live process holds the lock; the message names it."""


class ExclusiveLock:
    """``with ExclusiveLock(path, what): ...``: this process alone works on ``what`` until the block ends."""

    def __init__(self, path: str | Path, what: str, remove: bool = True) -> None:
        self.path = Path(path)
        self.what = what
        self.remove = remove
        self._fd: int | None = None

    def acquire(self) -> "ExclusiveLock":
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_owner(fd)
                os.close(fd)
                raise LockHeld(f"{self.what} is in use by another run ({holder}); wait for it to finish, or stop it") from None
            try:  # the file may have been unlinked by its previous owner between our open and our flock: retry
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        if self.remove:
            self.path.unlink(missing_ok=True)  # while still locked, so no one can lock the old inode after us
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "ExclusiveLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_owner(fd: int) -> str:
    try:
        owner = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"pid {owner['pid']}, started {owner['started']}"
    except (ValueError, KeyError, OSError):
        return "pid unknown"


def remove_stale_dirs(parent: Path, prefix: str) -> list[Path]:
    """Remove folders ``parent/prefix*`` made by ``owned_temp_dir`` whose owner has died; return them."""
    removed = []
    for folder in parent.glob(f"{prefix}*"):
        lock_file = folder / OWNER_FILE
        try:  # a lock file younger than that may be one its owner has created but not yet locked
            if time.time() - lock_file.stat().st_mtime < FRESH_S:
                continue
        except OSError:
            continue
        try:
            with ExclusiveLock(lock_file, str(folder), remove=False):
                shutil.rmtree(folder, ignore_errors=True)
        except (LockHeld, OSError):
            continue
        removed.append(folder)
    return removed


@contextmanager
def owned_temp_dir(parent: str | Path, prefix: str) -> Iterator[Path]:
    """A temp folder in ``parent`` owned by this process, removed afterwards; stale ones of dead owners go first."""
    parent = Path(parent)
    remove_stale_dirs(parent, prefix)
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    lock = ExclusiveLock(folder / OWNER_FILE, str(folder), remove=False)
    try:
        lock.acquire()
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        lock.release()
