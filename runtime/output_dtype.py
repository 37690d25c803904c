"""Smaller vectors for a vector database: ``output_dtype`` float16, int8, uint8, binary or ubinary.

The semantics are sentence-transformers' ``quantize_embeddings`` (6.x), so vectors made here and there can be
mixed in one index:

- ``float16``: a cast;
- ``int8`` / ``uint8``: per dimension, ``floor((x - min) / ((max - min) / 255))`` clipped to 0..255 (minus 128 for
  int8), computed in float32, a zero-width range counting as width 255. ``min``/``max`` are the ``ranges``
  ([2, dim]: row 0 the minima, row 1 the maxima) of a calibration set: the same ranges must quantize the corpus
  and its queries, so they are saved beside an output (``OUTPUT.ranges.npy``) and can be given back;
- ``binary`` / ``ubinary``: the sign bits (x > 0), packed 8 per byte, first dimension in the high bit
  (``numpy.packbits``), as uint8 or, for ``binary``, minus 128 as int8. ``dim / 8`` bytes per vector.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from runtime.files.atomic import atomic_writer

OUTPUT_DTYPES = ("float32", "float16", "int8", "uint8", "binary", "ubinary")
NEEDS_RANGES = ("int8", "uint8")


def storage_dtype(output_dtype: str) -> np.dtype:
    """The numpy dtype an output of ``output_dtype`` is stored in."""
    check_output_dtype(output_dtype)
    return np.dtype({"binary": "int8", "ubinary": "uint8"}.get(output_dtype, output_dtype))


def stored_dim(output_dtype: str, dim: int) -> int:
    """Values per stored vector: ``dim``, or ``ceil(dim / 8)`` bytes for the packed binary types."""
    return (dim + 7) // 8 if output_dtype.endswith("binary") else dim


def check_output_dtype(output_dtype: str) -> None:
    if output_dtype not in OUTPUT_DTYPES:
        raise ValueError(f"output dtype must be one of {', '.join(OUTPUT_DTYPES)}, got {output_dtype!r}")


def calibration_ranges(vectors: np.ndarray) -> np.ndarray:
    """float32 [2, dim]: each dimension's minimum and maximum over ``vectors`` (at least two of them)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or len(vectors) < 2:
        raise ValueError("int8/uint8 ranges need a calibration set of at least two vectors")
    return np.vstack([vectors.min(axis=0), vectors.max(axis=0)]).astype(np.float32)


def quantize(vectors: np.ndarray, output_dtype: str, ranges: np.ndarray | None = None) -> np.ndarray:
    """``vectors`` (float32 [n, dim]) in ``output_dtype``; int8/uint8 need ``ranges`` (see ``calibration_ranges``)."""
    check_output_dtype(output_dtype)
    vectors = np.asarray(vectors, dtype=np.float32)
    if output_dtype == "float32":
        return vectors
    if output_dtype == "float16":
        return vectors.astype(np.float16)
    if output_dtype in NEEDS_RANGES:
        if ranges is None:
            raise ValueError(f"{output_dtype} output needs calibration ranges ([2, dim] minima and maxima)")
        ranges = np.asarray(ranges, dtype=np.float32)
        if ranges.shape != (2, vectors.shape[1]):
            raise ValueError(f"ranges must have shape (2, {vectors.shape[1]}), got {ranges.shape}")
        starts = ranges[0]
        steps = (ranges[1] - starts) / np.float32(255)
        steps = np.where(steps == 0, np.float32(1), steps)
        levels = np.clip(np.floor((vectors - starts) / steps), 0, 255)
        return levels.astype(np.uint8) if output_dtype == "uint8" else (levels - 128).astype(np.int8)
    bits = np.packbits(vectors > 0, axis=-1)
    return bits if output_dtype == "ubinary" else (bits.astype(np.int16) - 128).astype(np.int8)


def ranges_path(output: Path) -> Path:
    return Path(f"{output}.ranges.npy")


def save_ranges(path: Path, ranges: np.ndarray) -> None:
    with atomic_writer(path) as fh:
        np.save(fh, np.asarray(ranges, dtype=np.float32), allow_pickle=False)


def load_ranges(path: str | Path, dim: int) -> np.ndarray:
    """Ranges saved by an earlier run (``OUTPUT.ranges.npy``); a clear error for anything else."""
    path = Path(path)
    try:
        ranges = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a ranges .npy file ({exc})") from exc
    if ranges.shape != (2, dim) or not np.issubdtype(ranges.dtype, np.floating) or not np.isfinite(ranges).all():
        raise ValueError(f"{path}: ranges must be a finite float array of shape (2, {dim}), got {ranges.dtype} {ranges.shape}")
    if (ranges[1] < ranges[0]).any():
        raise ValueError(f"{path}: row 1 (maxima) is below row 0 (minima) in some dimension")
    return ranges.astype(np.float32)
