"""Reading the evaluation benchmarks' local data files with errors that name the file, the line and the field.

Shared by ``bench.quality.mteb``, ``bench.quality.billboard`` and ``bench.quality.prompt_retrieval``; no mteb or torch here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class DataError(ValueError):
    """A local data file that is malformed (bad input data, exit 1); the message names the file and line."""


class MissingData(DataError):
    """A file, folder or task that the data folder lacks, or a name nothing has (bad usage, exit 2)."""


def need_file(path: Path) -> Path:
    """``path`` if it is a file, else a ``MissingData`` naming it."""
    if not path.is_file():
        raise MissingData(f"{path}: file not found")
    return path


def read_jsonl(path: Path, fields: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Every non-empty line of a JSON-lines file as a dict; each must hold ``fields``."""
    rows = []
    with open(need_file(path), encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not JSON ({exc})") from exc
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            missing = [f for f in fields if f not in row]
            if missing:
                raise DataError(f"{path}:{lineno}: missing field(s) {missing}")
            rows.append(row)
    return rows


def read_json(path: Path) -> Any:
    """A whole JSON file, with the file and position in the error when it does not parse."""
    try:
        return json.loads(need_file(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: not JSON ({exc.msg})") from exc
