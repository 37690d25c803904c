"""Crash-safe progress for ``python -m runtime.encode``: finished shards on disk plus a small state file.

Beside ``OUTPUT`` lives the folder ``OUTPUT.parts/``: ``shard-NNNNNN.npz`` (vectors, source line numbers, ids) for
each finished window of ``shard_rows`` rows, and ``state.json`` (the job's settings and, for each committed shard,
its counts and the digest of the records it was made from). A shard file is written to a temp name and renamed,
then ``state.json`` is replaced the same way, so a ``kill -9`` at any moment leaves at worst one shard that is not
yet committed; the next run of the same command redoes it. Shards are fixed windows of the input, and each window
is batched the same way every time, so the resumed result is the same bytes as an uninterrupted run.

The input is trusted by content, not by size and mtime: a resumed run reads the records of the done windows anyway
(to reach the first new one) and checks each window's digest against the one saved with its shard, so an input
edited in place since the interrupted run is refused, not silently mixed into the output.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import zipfile
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from runtime.files.atomic import atomic_write_text, atomic_writer
from runtime.batching import BatchStats
from runtime.files.readers import Record

STATE_FORMAT = "instructor-encode-state/2"
COUNTS = ("rows", "tokens", "padded_tokens", "truncated", "batches", "chunks", "split_rows")


class ResumeError(RuntimeError):
    """The parts folder belongs to another job, is damaged, or the input changed; the message says what to do."""


def parts_dir(output: Path) -> Path:
    return Path(f"{output}.parts")


def records_digest(records: Iterable[Record]) -> str:
    """The content of a window of records (line, text, instruction, id): what its shard's vectors depend on."""
    digest = hashlib.blake2b(digest_size=16)
    for r in records:
        digest.update(json.dumps([r.line, r.text, r.instruction, r.id]).encode())
        digest.update(b"\n")
    return digest.hexdigest()


class ShardStore:
    """The parts folder of one output: committed shards, in order, with their counts and input digests."""

    def __init__(self, output: str | Path, job: dict[str, Any]) -> None:
        self.output = Path(output)
        self.dir = parts_dir(self.output)
        self.state_path = self.dir / "state.json"
        self.job = job
        self.shards: list[dict[str, Any]] = []

    def open(self, overwrite: bool = False) -> "ShardStore":
        """Start a new job, or pick up the committed shards of the same job; ``ResumeError`` for another job's."""
        if overwrite:
            self.remove()
        if self.state_path.is_file():
            try:
                state = json.loads(self.state_path.read_text(encoding="utf-8"))
            except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, huge integers
                raise self._damaged(f"unreadable ({exc})") from exc
            if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or state.get("job") != self.job:
                old = state.get("job") if isinstance(state, dict) and isinstance(state.get("job"), dict) else {}
                changed = sorted(k for k in set(old) | set(self.job) if old.get(k) != self.job.get(k))
                raise ResumeError(
                    f"{self.dir}: unfinished work of a different job (differs in: {', '.join(changed) or 'format'}); "
                    "run the same command to resume it, or pass --overwrite to start again"
                )
            self.shards = self._checked_shards(state.get("shards"))
            for index in range(len(self.shards)):
                if not self.shard_path(index).is_file():
                    raise ResumeError(f"{self.shard_path(index)}: committed shard missing; pass --overwrite to start again")
        else:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._write_state()
        return self

    def _damaged(self, why: str) -> ResumeError:
        return ResumeError(f"{self.state_path}: damaged state file: {why}; pass --overwrite to start again")

    def _checked_shards(self, shards: Any) -> list[dict[str, Any]]:
        """The state's shard records, each with every count a non-negative integer and a digest; else ``ResumeError``."""
        if not isinstance(shards, list):
            raise self._damaged(f"'shards' is {type(shards).__name__}, not a list")
        for index, shard in enumerate(shards):
            if not isinstance(shard, dict):
                raise self._damaged(f"shard {index} is {type(shard).__name__}, not an object")
            for key in (*COUNTS, "vectors"):
                value = shard.get(key)
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise self._damaged(f"shard {index}: {key!r} is {json.dumps(value)[:40]}, not a count")
            if not isinstance(shard.get("input_digest"), str):
                raise self._damaged(f"shard {index}: 'input_digest' missing or not a string")
        return list(shards)

    @property
    def done_rows(self) -> int:
        return sum(s["rows"] for s in self.shards)

    @property
    def stats(self) -> BatchStats:
        total = BatchStats()
        for shard in self.shards:
            total = total + BatchStats(**{k: shard[k] for k in COUNTS})
        return total

    def shard_path(self, index: int) -> Path:
        return self.dir / f"shard-{index:06d}.npz"

    def check_window(self, index: int, digest: str, first_line: int, last_line: int) -> None:
        """A done window read again must hold the records its shard was made from."""
        if self.shards[index]["input_digest"] != digest:
            raise ResumeError(
                f"{self.job.get('input')}: lines {first_line}-{last_line} changed since the interrupted run made "
                f"{self.shard_path(index).name}; its shards no longer match the input: pass --overwrite to start again"
            )

    def save_shard(self, arrays: dict[str, np.ndarray]) -> Path:
        """Write the next shard's file (not yet committed: ``commit`` records it in the state).

        ``arrays``: ``vectors`` (float32 [n, dim]) and ``lines`` (int64 [n]), and optionally ``ids``, ``chunk``,
        ``span``, one entry per output vector.
        """
        path = self.shard_path(len(self.shards))
        with atomic_writer(path) as fh:
            np.savez(fh, **arrays)
        return path

    def commit(self, stats: BatchStats, input_digest: str, vectors: int) -> None:
        """Record the shard just saved: its counts, the digest of its records and how many vectors it holds."""
        self.shards.append({**{k: getattr(stats, k) for k in COUNTS}, "input_digest": input_digest, "vectors": vectors})
        self._write_state()

    @property
    def vectors(self) -> int:
        return sum(s["vectors"] for s in self.shards)

    def iter_shards(self) -> Iterator[dict[str, np.ndarray]]:
        """The committed shards' arrays, in input order."""
        for index, shard in enumerate(self.shards):
            path = self.shard_path(index)
            try:
                with np.load(path, allow_pickle=False) as data:
                    arrays = {name: data[name] for name in data.files}
            except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
                raise ResumeError(f"{path}: unreadable shard ({exc}); pass --overwrite to start again") from exc
            if "vectors" not in arrays:
                raise ResumeError(f"{path}: unreadable shard (no vectors); pass --overwrite to start again")
            if len(arrays["vectors"]) != shard["vectors"]:
                raise ResumeError(f"{path}: {len(arrays['vectors'])} vectors, the state says {shard['vectors']}; pass --overwrite")
            yield arrays

    def temp_output(self) -> Path:
        """Where the final output is assembled before its rename (inside the parts folder, so never left behind)."""
        return self.dir / f"assembling{self.output.suffix}"

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def _write_state(self) -> None:
        state = {"format": STATE_FORMAT, "job": self.job, "shards": self.shards}
        atomic_write_text(self.state_path, json.dumps(state, indent=1) + "\n")
