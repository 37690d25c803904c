"""Output writers for ``python -m runtime.encode``: shards -> one ``.npy`` or ``.parquet``, then an atomic rename.

``.npy``: a ``[rows, dim]`` array of the output dtype (float32, float16, int8, uint8; the packed binary types
``[rows, dim / 8]``), rows in input order (skipped rows left out; the summary lists their line numbers).
``.parquet``: columns ``line`` (int64, the source line or row number), ``id`` (string, with ``--id-field``),
``chunk`` (int32) and ``span`` (two int32: the chunk's token span) with ``--chunk-output all``, and ``embedding``
(a fixed-size list of the output dtype), one row group per shard. Both are written to a temp name and fsynced;
the caller moves them into place with ``runtime.files.atomic.publish``. Shards hold float32; the output dtype is applied
here (``runtime.output_dtype``), with the same ranges for every shard.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from runtime.deps import require
from runtime.output_dtype import quantize, storage_dtype, stored_dim

OUTPUT_FORMATS = (".npy", ".parquet")


def check_output(path: Path, with_ids: bool, with_chunks: bool = False) -> None:
    """Refuse an output this module cannot write, before any work is done."""
    suffix = path.suffix.lower()
    if suffix not in OUTPUT_FORMATS:
        raise ValueError(f"{path}: output must end in {' or '.join(OUTPUT_FORMATS)}")
    if suffix == ".npy" and with_ids:
        raise ValueError(f"{path}: --id-field needs a .parquet output (a .npy holds vectors only)")
    if suffix == ".npy" and with_chunks:
        raise ValueError(f"{path}: --chunk-output all needs a .parquet output (to keep each chunk's row, number and span)")
    if suffix == ".parquet":
        _pyarrow()


def _pyarrow():
    return require("pyarrow", "io", "writing .parquet"), require("pyarrow.parquet", "io", "writing .parquet")


def write_output(
    shards: Iterable[dict[str, np.ndarray]], path: Path, rows: int, dim: int, output_dtype: str,
    ranges: np.ndarray | None = None, columns: tuple[str, ...] = (),
) -> None:
    """Write all shards to ``path`` (a temp name: the caller renames it into place) and fsync it.

    ``rows``: vectors in all shards; ``columns``: the optional parquet columns to write (``id``, ``chunk``, ``span``).
    """
    if path.suffix.lower() == ".npy":
        _write_npy(shards, path, rows, dim, output_dtype, ranges)
    else:
        _write_parquet(shards, path, dim, output_dtype, ranges, columns)


def _write_npy(shards: Iterable[dict[str, np.ndarray]], path: Path, rows: int, dim: int, output_dtype: str,
               ranges: np.ndarray | None) -> None:
    dtype = storage_dtype(output_dtype)
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (rows, stored_dim(output_dtype, dim))}
    written = 0
    with open(path, "wb") as fh:
        np.lib.format.write_array_header_1_0(fh, header)
        for shard in shards:
            block = np.ascontiguousarray(quantize(shard["vectors"], output_dtype, ranges))
            fh.write(block.tobytes())
            written += len(block)
        fh.flush()
        os.fsync(fh.fileno())
    if written != rows:
        raise RuntimeError(f"{path}: wrote {written} rows, expected {rows}")


def _arrow_type(pa: Any, output_dtype: str) -> Any:
    return {"float32": pa.float32(), "float16": pa.float16(), "int8": pa.int8(), "uint8": pa.uint8()}[
        storage_dtype(output_dtype).name
    ]


def embedding_array(vectors: np.ndarray, output_dtype: str, ranges: np.ndarray | None) -> Any:
    """The parquet ``embedding`` column of float32 ``vectors``: a fixed-size list of the output dtype."""
    pa, _ = _pyarrow()
    block = quantize(vectors, output_dtype, ranges)
    value_type = _arrow_type(pa, output_dtype)
    return pa.FixedSizeListArray.from_arrays(pa.array(block.reshape(-1), type=value_type), block.shape[1])


def _write_parquet(shards: Iterable[dict[str, np.ndarray]], path: Path, dim: int, output_dtype: str,
                   ranges: np.ndarray | None, columns: tuple[str, ...]) -> None:
    pa, pq = _pyarrow()
    value_type = _arrow_type(pa, output_dtype)
    width = stored_dim(output_dtype, dim)
    schema = pa.schema(
        [pa.field("line", pa.int64())]
        + ([pa.field("id", pa.string())] if "id" in columns else [])
        + ([pa.field("chunk", pa.int32()), pa.field("span", pa.list_(pa.int32(), 2))] if "chunk" in columns else [])
        + [pa.field("embedding", pa.list_(value_type, width))]
    )
    with pq.ParquetWriter(path, schema) as writer:
        for shard in shards:
            data = {"line": pa.array(shard["lines"], type=pa.int64())}
            if "id" in columns:
                data["id"] = pa.array(shard["ids"].tolist(), type=pa.string())
            if "chunk" in columns:
                data["chunk"] = pa.array(shard["chunk"], type=pa.int32())
                data["span"] = pa.FixedSizeListArray.from_arrays(pa.array(shard["span"].reshape(-1), type=pa.int32()), 2)
            data["embedding"] = embedding_array(shard["vectors"], output_dtype, ranges)
            writer.write_table(pa.table(data, schema=schema))
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())
