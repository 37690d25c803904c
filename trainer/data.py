"""MEDI training data: one validating pass builds a byte-offset index; rows are then read on demand.

The real MEDI file is a 1.4M-row JSON list. Every process keeps only the index (offset, length and task of each
row: 16 bytes a row) and reads the rows of its current batch from a shared read-only memory map, so the data is
never parsed into memory, let alone once per process. Both a JSON list and JSON lines are accepted; each row is
``{"query": [I, x], "pos": [I, x], "neg": [I, x], "task_name": str}`` or the same with ``"task_id": int``.
"""

from __future__ import annotations

import json
import mmap
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from tqdm.auto import tqdm

from runtime.files.readers import parse_json_line
from runtime.tokenization import has_lone_surrogate

SIDES = ("query", "pos", "neg")
INDEX_VERSION = 1
_READ_CHUNK = 1 << 24  # characters decoded at a time while indexing a JSON list


class DataError(ValueError):
    """Training data that cannot be used; the message names the file, the row and the field."""


def resolve_data_path(path: str | Path) -> Path:
    """A data file, or a folder holding one (upstream's ``--cache_dir`` holds ``medi-data.json``)."""
    p = Path(path)
    if p.is_file():
        return p
    if p.is_dir():
        if (p / "medi-data.json").is_file():
            return p / "medi-data.json"
        found = sorted(x for x in p.iterdir() if x.suffix in (".json", ".jsonl") and x.is_file())
        if len(found) == 1:
            return found[0]
        raise DataError(
            f"{p}: expected medi-data.json or exactly one .json/.jsonl file in the folder, found {[x.name for x in found]}"
        )
    raise DataError(f"{p}: training data not found")


def validate_row(obj: Any, where: str) -> str | int:
    """Check one row and return its task key (the ``task_name`` string or the ``task_id`` integer).

    Everything the training step will do with the row must work: a string the tokenizer cannot take (a lone
    surrogate from ``"\\ud800"`` in JSON) is refused here, before step 1, not in the middle of training.
    """
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected an object with query/pos/neg, got {type(obj).__name__}")
    for side in SIDES:
        if side not in obj:
            raise DataError(f"{where}: missing field {side!r}")
        pair = obj[side]
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(s, str) for s in pair)):
            shown = json.dumps(pair, ensure_ascii=False)
            raise DataError(
                f"{where}: field {side!r} must be an [instruction, text] pair of strings, got {shown[:120]}"
            )
        for element, text in enumerate(pair):
            if has_lone_surrogate(text):
                raise DataError(f"{where}: field {side!r} element {element}: invalid unicode (lone surrogate)")
    if "task_name" in obj:
        task = obj["task_name"]
        if not isinstance(task, str):
            raise DataError(f"{where}: field 'task_name' must be a string, got {type(task).__name__}")
        if not task.strip() or has_lone_surrogate(task):
            raise DataError(f"{where}: field 'task_name' is empty or not valid text")
        return task
    if "task_id" in obj:
        task = obj["task_id"]
        if isinstance(task, bool) or not isinstance(task, int):
            raise DataError(f"{where}: field 'task_id' must be an integer, got {json.dumps(task)[:60]}")
        return task
    raise DataError(f"{where}: missing field 'task_name' (or 'task_id')")


BOM = b"\xef\xbb\xbf"


def _has_bom(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(3) == BOM


def _iter_json_list(path: Path) -> Iterator[tuple[int, int, Any, str]]:
    """Yield (byte offset, byte length, object, "row N") for each element of a top-level JSON list, reading in chunks."""
    decoder = json.JSONDecoder()
    bom = _has_bom(path)
    with open(path, encoding="utf-8-sig" if bom else "utf-8") as f:
        buf, i, byte_pos, eof, row = "", 0, len(BOM) if bom else 0, False, 0

        def more() -> bool:
            nonlocal buf, i, eof
            try:
                chunk = f.read(_READ_CHUNK)
            except UnicodeDecodeError as exc:
                raise DataError(f"{path}: not valid UTF-8 ({exc.reason}) after row {row}, near byte {byte_pos}") from None
            eof = not chunk
            buf, i = buf[i:] + chunk, 0
            return not eof

        def skip_ws() -> None:
            nonlocal i, byte_pos
            while True:
                j = i
                while j < len(buf) and buf[j] in " \t\r\n":
                    j += 1
                byte_pos += j - i  # whitespace and separators are ASCII: one byte a character
                i = j
                if i < len(buf) or not more():
                    return

        skip_ws()
        if i >= len(buf) or buf[i] != "[":
            raise DataError(f"{path}: a JSON data file must hold a list of rows (starts with '[')")
        i, byte_pos = i + 1, byte_pos + 1
        skip_ws()
        if i < len(buf) and buf[i] == "]":
            return
        while True:
            while True:
                try:
                    obj, end = decoder.raw_decode(buf, i)
                    break
                except json.JSONDecodeError as exc:
                    if eof or not more():
                        raise DataError(f"{path}: row {row}: invalid JSON at byte {byte_pos} ({exc.msg})") from None
                except RecursionError:
                    raise DataError(f"{path}: row {row}: JSON nested too deeply, at byte {byte_pos}") from None
                except ValueError as exc:  # an integer of more digits than int() converts
                    raise DataError(f"{path}: row {row}: unreadable JSON value at byte {byte_pos} ({str(exc).split(':')[0]})") from None
            length = len(buf[i:end].encode("utf-8"))
            yield byte_pos, length, obj, f"row {row}"
            byte_pos += length
            i, row = end, row + 1
            skip_ws()
            if i >= len(buf):
                raise DataError(f"{path}: the JSON list is not closed with ']' (after row {row - 1})")
            if buf[i] == "]":
                return
            if buf[i] != ",":
                raise DataError(f"{path}: row {row}: expected ',' or ']' between rows at byte {byte_pos}")
            i, byte_pos = i + 1, byte_pos + 1
            skip_ws()


def _iter_json_lines(path: Path) -> Iterator[tuple[int, int, Any, str]]:
    with open(path, "rb") as f:
        offset = 0
        for lineno, line in enumerate(f, start=1):
            start = len(BOM) if lineno == 1 and line.startswith(BOM) else 0
            if line.strip():
                try:
                    text = line[start:].decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise DataError(f"{path}: line {lineno}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
                obj, why = parse_json_line(text)
                if why is not None:
                    raise DataError(f"{path}: line {lineno}: {why}")
                yield offset + start, len(line) - start, obj, f"line {lineno}"
            offset += len(line)


def _is_json_list(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(4096)
    return head.removeprefix(BOM).lstrip()[:1] == b"["


@dataclass
class MediIndex:
    """Where each row lies in the file and which task it belongs to (tasks numbered in order of appearance)."""

    path: Path
    offsets: np.ndarray  # int64 [rows]
    lengths: np.ndarray  # int64 [rows]
    task: np.ndarray  # int32 [rows]: index into task_keys
    task_keys: list[str | int]

    def __len__(self) -> int:
        return len(self.offsets)

    @classmethod
    def build(cls, path: str | Path, show_progress: bool = True) -> "MediIndex":
        """Validate every row (errors name the row and field) and index it, in one streaming pass."""
        path = resolve_data_path(path)
        json_list = _is_json_list(path)
        rows = _iter_json_list(path) if json_list else _iter_json_lines(path)
        offsets: list[int] = []
        lengths: list[int] = []
        tasks: list[int] = []
        codes: dict[str | int, int] = {}
        bar = tqdm(total=path.stat().st_size, unit="B", unit_scale=True, desc=f"Indexing {path.name}", disable=not show_progress)
        with bar:
            for offset, length, obj, label in rows:
                key = validate_row(obj, f"{path}: {label}")
                tasks.append(codes.setdefault(key, len(codes)))
                offsets.append(offset)
                lengths.append(length)
                bar.update(offset + length - bar.n)
        if not offsets:
            raise DataError(f"{path}: no training rows")
        kinds = {type(k) for k in codes}
        if len(kinds) > 1:
            raise DataError(f"{path}: rows mix 'task_name' (str) and 'task_id' (int); use one of them throughout")
        return cls(
            path,
            np.asarray(offsets, np.int64),
            np.asarray(lengths, np.int64),
            np.asarray(tasks, np.int32),
            list(codes),
        )

    def save(self, out: str | Path) -> None:
        stat = self.path.stat()
        np.savez(
            out,
            offsets=self.offsets,
            lengths=self.lengths,
            task=self.task,
            meta=np.array(
                json.dumps(
                    {
                        "version": INDEX_VERSION,
                        "path": str(self.path.resolve()),
                        "size": stat.st_size,
                        "mtime_ns": stat.st_mtime_ns,
                        "task_keys": self.task_keys,
                    }
                )
            ),
        )

    @classmethod
    def load(cls, index_file: str | Path, data_path: str | Path) -> "MediIndex | None":
        """The cached index, or None when it is missing, damaged or was built from another version of the file.

        It is only a cache: a truncated or edited ``data-index.npz`` is rebuilt from the data, never trusted or fatal.
        """
        index_file = Path(index_file)
        path = resolve_data_path(data_path)
        if not index_file.is_file():
            return None
        stat = path.stat()
        try:
            with np.load(index_file) as z:  # allow_pickle stays off: arrays only
                meta = json.loads(str(z["meta"]))
                if (meta.get("version"), meta.get("path"), meta.get("size"), meta.get("mtime_ns")) != (
                    INDEX_VERSION,
                    str(path.resolve()),
                    stat.st_size,
                    stat.st_mtime_ns,
                ):
                    return None
                index = cls(path, z["offsets"], z["lengths"], z["task"], list(meta["task_keys"]))
        except (OSError, ValueError, KeyError, AttributeError, TypeError, EOFError, zipfile.BadZipFile):
            return None
        return index if index.consistent(stat.st_size) else None

    def consistent(self, size: int) -> bool:
        """Whether the arrays can index a file of ``size`` bytes: same row counts, rows inside it, known tasks."""
        n = len(self.offsets)
        return (
            n > 0 and len(self.lengths) == n and len(self.task) == n
            and bool((self.offsets >= 0).all() and (self.lengths > 0).all() and (self.offsets + self.lengths <= size).all())
            and bool((self.task >= 0).all() and (self.task < len(self.task_keys)).all())
        )

    def rows_of_task(self) -> list[np.ndarray]:
        """Row numbers of each task, in file order."""
        order = np.argsort(self.task, kind="stable")
        bounds = np.cumsum(np.bincount(self.task, minlength=len(self.task_keys)))[:-1]
        return np.split(order, bounds)


class RowReader:
    """Reads rows by number from a read-only memory map of the data file (pages shared between processes)."""

    def __init__(self, index: MediIndex) -> None:
        self.index = index
        self._file = open(index.path, "rb")
        self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)

    def __getitem__(self, row: int) -> dict[str, Any]:
        start = int(self.index.offsets[row])
        return json.loads(self._map[start : start + int(self.index.lengths[row])])

    def rows(self, numbers: np.ndarray) -> list[dict[str, Any]]:
        return [self[int(r)] for r in numbers]

    def close(self) -> None:
        self._map.close()
        self._file.close()
