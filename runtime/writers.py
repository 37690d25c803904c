"""Output writers for ``python -m runtime.encode``: shards -> one ``.npy`` or ``.parquet``, then an atomic rename.

``.npy``: a float32 (or float16) ``[rows, dim]`` array, rows in input order (skipped rows left out; the summary
lists their line numbers). ``.parquet``: columns ``line`` (int64, the source line or row number), ``id`` (string,
with ``--id-field``) and ``embedding`` (fixed-size list of float32/float16), one row group per shard. Both are
written to a temp name and fsynced; the caller moves them into place with ``runtime.atomic.publish``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import numpy as np

OUTPUT_FORMATS = (".npy", ".parquet")
DTYPES = ("float32", "float16")


def check_output(path: Path, dtype: str, with_ids: bool) -> None:
    """Refuse an output this module cannot write, before any work is done."""
    suffix = path.suffix.lower()
    if suffix not in OUTPUT_FORMATS:
        raise ValueError(f"{path}: output must end in {' or '.join(OUTPUT_FORMATS)}")
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {DTYPES}, got {dtype!r}")
    if suffix == ".npy" and with_ids:
        raise ValueError(f"{path}: --id-field needs a .parquet output (a .npy holds vectors only)")
    if suffix == ".parquet":
        _pyarrow()


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise ValueError("writing .parquet needs pyarrow: pip install 'instructor-stack[io]'") from exc
    return pa, pq


def write_output(
    shards: Iterable[dict[str, np.ndarray]], path: Path, rows: int, dim: int, dtype: str, with_ids: bool = False
) -> None:
    """Write all shards to ``path`` (a temp name: the caller renames it into place) and fsync it."""
    if path.suffix.lower() == ".npy":
        _write_npy(shards, path, rows, dim, np.dtype(dtype))
    else:
        _write_parquet(shards, path, dim, np.dtype(dtype), with_ids)


def _write_npy(shards: Iterable[dict[str, np.ndarray]], path: Path, rows: int, dim: int, dtype: np.dtype) -> None:
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (rows, dim)}
    written = 0
    with open(path, "wb") as fh:
        np.lib.format.write_array_header_1_0(fh, header)
        for shard in shards:
            block = np.ascontiguousarray(shard["vectors"].astype(dtype, copy=False))
            fh.write(block.tobytes())
            written += len(block)
        fh.flush()
        os.fsync(fh.fileno())
    if written != rows:
        raise RuntimeError(f"{path}: wrote {written} rows, expected {rows}")


def _write_parquet(shards: Iterable[dict[str, np.ndarray]], path: Path, dim: int, dtype: np.dtype, with_ids: bool) -> None:
    pa, pq = _pyarrow()
    value_type = pa.float16() if dtype == np.float16 else pa.float32()
    writer = None
    try:
        for shard in shards:
            flat = pa.array(shard["vectors"].astype(dtype, copy=False).reshape(-1), type=value_type)
            columns = {"line": pa.array(shard["lines"], type=pa.int64())}
            if "ids" in shard:
                columns["id"] = pa.array(shard["ids"].tolist(), type=pa.string())
            columns["embedding"] = pa.FixedSizeListArray.from_arrays(flat, dim)
            table = pa.table(columns)
            if writer is None:
                writer = pq.ParquetWriter(path, table.schema)
            writer.write_table(table)
        if writer is None:  # no rows at all: still a valid, empty file
            fields = [pa.field("line", pa.int64())] + ([pa.field("id", pa.string())] if with_ids else [])
            fields.append(pa.field("embedding", pa.list_(value_type, dim)))
            pq.write_table(pa.schema(fields).empty_table(), path)
    finally:
        if writer is not None:
            writer.close()
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())
