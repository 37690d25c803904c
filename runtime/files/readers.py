"""Input readers for ``python -m runtime.encode``: stream records from .txt, .jsonl, .csv/.tsv and .parquet.

Every reader yields ``Record``s one at a time (never the whole file) and reports a bad row as ``InputError``
naming the file, the line (or parquet row) and the field. With ``on_error="skip"`` the bad row is recorded in
``Skipped`` instead and reading goes on. Line numbers start at 1 (a CSV header is line 1).

What writers of such files produce is accepted: a UTF-8 byte-order mark at the start (Excel writes one), and blank
lines in JSON Lines (skipped and counted, as pandas and jq do). What cannot be embedded is a bad row, never a crash:
strings with lone surrogates (``"\ud800"`` in JSON), numbers past Python's digit limit, nesting past its
recursion limit.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from runtime.deps import require
from runtime.tokenization import has_lone_surrogate

FORMATS = {".txt": "txt", ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet"}
MAX_LISTED = 1000  # skipped line numbers kept for the summary (the count is always exact)
MAX_ERRORS = 10  # skipped rows' messages kept for the summary
BOM = "\ufeff"
INSTRUCTION_NAMES = ("instruction",)  # a field by this name, left unused, is most likely a forgotten --instruction-field


class InputError(ValueError):
    """A bad input row: ``file:line: field: what is wrong``."""

    def __init__(self, path: Path, line: int | None, fieldname: str | None, message: str) -> None:
        where = f"{path}:{line}" if line is not None else str(path)
        what = f"field {fieldname!r}: {message}" if fieldname else message
        super().__init__(f"{where}: {what}")
        self.path, self.line, self.field, self.message = path, line, fieldname, message

    def __reduce__(self):  # picklable with its fields, so it crosses process boundaries (Ray workers) intact
        return (InputError, (self.path, self.line, self.field, self.message))


@dataclass
class Record:
    line: int  # 1-based line (jsonl/txt/csv physical line where the row starts) or parquet row number
    text: str
    instruction: str | None = None
    id: str | None = None

    def as_input(self) -> str | list[str]:
        return self.text if self.instruction is None else [self.instruction, self.text]


@dataclass(frozen=True)
class UnusedInstruction:
    """Rows hold an instruction-like field (``name``, first at ``line``) that nothing uses: no ``--instruction-field``
    and no ``--instruction`` was given, so they are embedded as plain text. Worth a warning, not an error: plain text
    may be what was meant."""

    name: str
    line: int | None  # None: the column of a parquet file

    def warning(self, path: str | Path) -> str:
        where = f"{path}:{self.line}" if self.line is not None else str(path)
        return (
            f"{where}: rows have an {self.name!r} field, but without --instruction-field it is not used: they are "
            f"embedded as plain text (pass --instruction-field {self.name} to embed [instruction, text] pairs)"
        )


@dataclass
class Skipped:
    """What reading left out: rows skipped under ``--on-error skip`` (exact count, the first ``MAX_LISTED`` line
    numbers and messages), blank lines, and an instruction-like field left unused."""

    count: int = 0
    lines: list[int] = field(default_factory=list)
    first_errors: list[str] = field(default_factory=list)
    blank_lines: int = 0  # blank lines of a JSON Lines file: not rows, not errors, only counted
    unused_instruction: UnusedInstruction | None = None  # the first such field seen

    def add(self, err: InputError) -> None:
        self.count += 1
        if len(self.lines) < MAX_LISTED:
            self.lines.append(int(err.line or 0))
        if len(self.first_errors) < MAX_ERRORS:
            self.first_errors.append(str(err))


@dataclass(frozen=True)
class Span:
    """A part of an input that a worker reads on its own: byte offsets ``[start, end)`` that begin at line
    ``first_line`` (.txt/.jsonl), or row groups ``[start, end)`` that begin at row ``first_line`` (.parquet)."""

    start: int
    end: int
    first_line: int


@dataclass
class ReaderOptions:
    text_field: str = "text"
    instruction: str | None = None  # one instruction for every row
    instruction_field: str | None = None  # or one per row
    id_field: str | None = None
    on_error: str = "raise"  # or "skip"


def input_format(path: Path) -> str:
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise InputError(path, None, None, f"unknown input type {path.suffix!r} (use {', '.join(sorted(FORMATS))})")
    return fmt


def read_records(path: str | Path, opts: ReaderOptions, skipped: Skipped, span: Span | None = None) -> Iterator[Record]:
    """Records of ``path`` (or of one ``span`` of it) in file order; bad rows raise ``InputError`` or go to ``skipped``."""
    path = Path(path)
    fmt = input_format(path)
    if not path.is_file():
        raise InputError(path, None, None, "input file not found")
    if opts.on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {opts.on_error!r}")
    if span is not None and fmt in ("csv", "tsv"):
        raise ValueError(f"{path}: a CSV file is read whole (a quoted field may span lines), not in spans")
    readers = {"txt": _txt_rows, "jsonl": _jsonl_rows, "csv": _csv_rows, "tsv": _csv_rows, "parquet": _parquet_rows}
    rows = readers[fmt](path, opts, span) if fmt != "csv" and fmt != "tsv" else readers[fmt](path, opts)
    for row in rows:
        if row is None:
            skipped.blank_lines += 1
        elif isinstance(row, UnusedInstruction):
            skipped.unused_instruction = skipped.unused_instruction or row
        elif isinstance(row, InputError):
            if opts.on_error == "raise":
                raise row
            skipped.add(row)
        else:
            yield row


def _decoded_lines(path: Path, span: Span | None = None) -> Iterator[tuple[int, str | InputError]]:
    """(line number, text without its line break) for each line; undecodable bytes become an ``InputError``."""
    with open(path, "rb") as fh:
        lines: Iterator[bytes] = fh
        first = 1
        if span is not None:
            fh.seek(span.start)
            lines = _lines_until(fh, span.end)
            first = span.first_line
        for number, raw in enumerate(lines, start=first):
            try:
                text = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as exc:
                yield number, InputError(path, number, None, f"not valid UTF-8 ({exc.reason} at byte {exc.start})")
                continue
            yield number, text[1:] if number == 1 and text.startswith(BOM) else text


def _lines_until(fh, end: int) -> Iterator[bytes]:
    while fh.tell() < end and (raw := fh.readline()):
        yield raw


def plan_spans(path: str | Path, target_bytes: int = 64 << 20) -> list[Span]:
    """Cut an input into spans of about ``target_bytes`` for parallel reading, in one streaming pass.

    Line formats are cut just after a line break (the scan counts line breaks, so each span knows its first line
    number); parquet is cut at row-group boundaries (row counts come from the footer); CSV stays whole.
    """
    path = Path(path)
    fmt = input_format(path)
    if not path.is_file():
        raise InputError(path, None, None, "input file not found")
    if fmt == "parquet":
        import pyarrow.parquet as pq

        meta = pq.ParquetFile(path).metadata
        spans, start, first, size, rows = [], 0, 1, 0, 0
        for group in range(meta.num_row_groups):
            size += meta.row_group(group).total_byte_size
            rows += meta.row_group(group).num_rows
            if size >= target_bytes or group == meta.num_row_groups - 1:
                spans.append(Span(start, group + 1, first))
                start, first, size, rows = group + 1, first + rows, 0, 0
        return spans
    if fmt in ("csv", "tsv"):
        return [Span(0, path.stat().st_size, 1)]
    spans, start, start_line, offset, pending = [], 0, 1, 0, 0  # pending: line breaks in [start, offset)
    with open(path, "rb") as fh:
        while block := fh.read(1 << 22):
            low = max(start - offset, 0)
            while (want := start + target_bytes - offset - 1) < len(block):
                cut = block.find(b"\n", max(want, low))
                if cut < 0:
                    break
                lines = pending + block.count(b"\n", low, cut + 1)
                spans.append(Span(start, offset + cut + 1, start_line))
                start, start_line, pending, low = offset + cut + 1, start_line + lines, 0, cut + 1
            pending += block.count(b"\n", low)
            offset += len(block)
    if offset > start or not spans:
        spans.append(Span(start, offset, start_line))
    return spans


def _field(path: Path, line: int, row: dict[str, Any], name: str, required: bool) -> str | None:
    """A string field of a row; a missing or non-string value is an ``InputError`` naming it."""
    if name not in row:
        if not required:
            return None
        raise InputError(path, line, name, "missing")
    value = row[name]
    if not isinstance(value, str):
        raise InputError(path, line, name, f"expected a string, got {type(value).__name__} {_short(value)}")
    if has_lone_surrogate(value):
        raise InputError(path, line, name, "invalid unicode (lone surrogate)")
    return value


def _id_field(path: Path, line: int, row: dict[str, Any], name: str) -> str:
    if name not in row:
        raise InputError(path, line, name, "missing")
    value = row[name]
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise InputError(path, line, name, f"expected a string or an integer id, got {type(value).__name__} {_short(value)}")
    if isinstance(value, str) and has_lone_surrogate(value):
        raise InputError(path, line, name, "invalid unicode (lone surrogate)")
    return str(value)


def _record(path: Path, line: int, row: dict[str, Any], opts: ReaderOptions) -> Record | InputError:
    try:
        text = str(_field(path, line, row, opts.text_field, required=True))
        instruction = opts.instruction
        if opts.instruction_field is not None:
            instruction = _field(path, line, row, opts.instruction_field, required=True)
        rid = _id_field(path, line, row, opts.id_field) if opts.id_field is not None else None
    except InputError as err:
        return err
    return Record(line=line, text=text, instruction=instruction, id=rid)


def _unused_instruction(names: Any, opts: ReaderOptions) -> str | None:
    """The instruction-like field among ``names`` that these options leave unused, if any."""
    if opts.instruction is not None or opts.instruction_field is not None:
        return None
    return next((n for n in INSTRUCTION_NAMES if n in names and n not in (opts.text_field, opts.id_field)), None)


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def _txt_rows(path: Path, opts: ReaderOptions, span: Span | None = None) -> Iterator[Record | InputError]:
    """One document per line (an empty line is an empty document, as ``encode([""])`` would embed it)."""
    for field_name in (opts.instruction_field, opts.id_field):
        if field_name is not None:
            raise InputError(path, None, field_name, "a .txt input has no fields (use .jsonl, .csv or .parquet)")
    for line, text in _decoded_lines(path, span):
        yield text if isinstance(text, InputError) else Record(line=line, text=text, instruction=opts.instruction)


def parse_json_line(text: str) -> tuple[Any, str | None]:
    """``(value, None)``, or ``(None, why)`` for a line that is not JSON Python can hold (shared with the trainer)."""
    try:
        return json.loads(text), None
    except json.JSONDecodeError as exc:
        return None, f"malformed JSON ({exc.msg} at column {exc.colno})"
    except RecursionError:
        return None, "JSON nested too deeply"
    except ValueError as exc:  # an integer of more digits than int() converts: keep the reason, not Python's advice
        return None, f"unreadable JSON value ({str(exc).split(':')[0]})"


def _jsonl_rows(
    path: Path, opts: ReaderOptions, span: Span | None = None
) -> Iterator[Record | InputError | UnusedInstruction | None]:
    """Records; ``None`` for a blank line (counted by ``read_records``, never an error); the first unused
    instruction-like field once, before its row."""
    watch = _unused_instruction(INSTRUCTION_NAMES, opts) is not None
    for line, text in _decoded_lines(path, span):
        if isinstance(text, InputError):
            yield text
            continue
        if not text.strip():
            yield None
            continue
        row, why = parse_json_line(text)
        if why is not None:
            yield InputError(path, line, None, why)
            continue
        if not isinstance(row, dict):
            yield InputError(path, line, None, f"expected a JSON object, got {type(row).__name__}")
            continue
        if watch and (name := _unused_instruction(row, opts)):
            yield UnusedInstruction(name, line)
            watch = False
        yield _record(path, line, row, opts)


def _csv_rows(path: Path, opts: ReaderOptions) -> Iterator[Record | InputError | UnusedInstruction]:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    position = {"line": 0}
    undecodable: dict[int, InputError] = {}

    def physical() -> Iterator[str]:
        for number, text in _decoded_lines(path):
            position["line"] = number
            if isinstance(text, InputError):  # parse on, so a quoted field spanning lines ends where it should
                undecodable[number] = text
                text = ""
            yield text + "\n"

    reader = csv.reader(physical(), delimiter=delimiter, strict=True)
    try:
        header = next(reader)
    except StopIteration:
        return
    except csv.Error as exc:
        raise InputError(path, position["line"], None, f"malformed CSV header ({exc})") from exc
    if undecodable:
        raise next(iter(undecodable.values()))
    for name in (opts.text_field, opts.instruction_field, opts.id_field):
        if name is not None and name not in header:
            raise InputError(path, 1, name, f"no such column (the header has {header})")
    if name := _unused_instruction(header, opts):
        yield UnusedInstruction(name, 1)
    while True:
        start = position["line"] + 1
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            yield InputError(path, start, None, f"malformed CSV ({exc})")
            continue
        bad = [undecodable.pop(n) for n in range(start, position["line"] + 1) if n in undecodable]
        if bad:
            yield bad[0]
        elif not cells:
            yield InputError(path, start, None, "empty line")
        elif len(cells) != len(header):
            yield InputError(path, start, None, f"{len(cells)} cells, the header has {len(header)}")
        else:
            yield _record(path, start, dict(zip(header, cells)), opts)


def _parquet_rows(
    path: Path, opts: ReaderOptions, span: Span | None = None
) -> Iterator[Record | InputError | UnusedInstruction]:
    """Rows in file order, read a record batch at a time; ``line`` is the 1-based row number.

    A row group that cannot be decoded (a damaged page) stops the read with an ``InputError`` naming the group
    and its rows, whatever ``on_error`` says: its rows cannot be told apart.
    """
    pq = require("pyarrow.parquet", "io", "reading .parquet")
    try:
        pfile = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid / OSError for a non-parquet file
        raise InputError(path, None, None, f"not a readable parquet file ({exc})") from exc
    columns = [f for f in (opts.text_field, opts.instruction_field, opts.id_field) if f is not None]
    names = pfile.schema_arrow.names
    for name in columns:
        if name not in names:
            raise InputError(path, None, name, f"no such column (the file has {names})")
    if name := _unused_instruction(names, opts):
        yield UnusedInstruction(name, None)
    row_number = 0 if span is None else span.first_line - 1
    groups = range(pfile.num_row_groups) if span is None else range(span.start, span.end)
    for group in groups:
        first, size = row_number + 1, pfile.metadata.row_group(group).num_rows
        batches = pfile.iter_batches(batch_size=4096, columns=columns, row_groups=[group])
        while True:
            try:
                batch = next(batches, None)
            except (OSError, ValueError) as exc:  # pyarrow: OSError / ArrowInvalid for a damaged page
                why = " ".join(str(exc).split())
                raise InputError(path, None, None, f"row group {group} (rows {first}-{first + size - 1}) is damaged and "
                                 f"cannot be read ({why})") from exc
            if batch is None:
                break
            for row in batch.to_pylist():
                row_number += 1
                yield _record(path, row_number, row, opts)
