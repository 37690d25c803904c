"""Vectors into response bodies: the one place that decides how a vector is written.

``encoding_format`` is OpenAI's: ``float`` (a JSON array) or ``base64`` (the little-endian bytes of the vector;
float32 by default, which the official client decodes with ``numpy.frombuffer(..., "float32")``).
``embedding_type`` (as Cohere's ``embedding_types``, one per request) makes the vectors smaller first, with the
runtime's rules (``runtime.output_dtype``): ``float`` (float32), ``float16``, ``int8``, ``uint8`` (both with the
server's ``--int8-ranges``), ``binary``, ``ubinary`` (sign bits, 8 per byte). A JSON array then holds the values of
that type (small integers for the integer types); base64 holds their bytes.
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
import orjson

from runtime.output_dtype import quantize

ENCODING_FORMATS = ("float", "base64")
EMBEDDING_TYPES = ("float", "float16", "int8", "uint8", "binary", "ubinary")


def output_dtype(embedding_type: str) -> str:
    """The runtime's name of an ``embedding_type`` (``float`` is float32)."""
    return "float32" if embedding_type == "float" else embedding_type


def encode_rows(vectors: np.ndarray, encoding_format: str, embedding_type: str = "float",
                ranges: np.ndarray | None = None) -> list[Any]:
    """One JSON-ready value per row: a numpy row of the embedding type (orjson writes it as an array) or base64."""
    if encoding_format not in ENCODING_FORMATS:
        raise ValueError(f"encoding_format must be one of {ENCODING_FORMATS}, got {encoding_format!r}")
    values = quantize(vectors, output_dtype(embedding_type), ranges)
    rows = np.ascontiguousarray(values, dtype=values.dtype.newbyteorder("<"))
    if encoding_format == "base64":
        return [base64.b64encode(row.tobytes()).decode("ascii") for row in rows]
    return list(rows)


def openai_body(vectors: np.ndarray, encoding_format: str, embedding_type: str, ranges: np.ndarray | None,
                model: str, tokens: int) -> bytes:
    """The body of ``POST /v1/embeddings``: ``data[i]`` in input order, ``model`` and ``usage``."""
    rows = encode_rows(vectors, encoding_format, embedding_type, ranges)
    data = [{"object": "embedding", "index": i, "embedding": row} for i, row in enumerate(rows)]
    body = {"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
    return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)


def tei_body(vectors: np.ndarray, embedding_type: str = "float", ranges: np.ndarray | None = None) -> bytes:
    """The body of ``POST /embed``: a JSON array of vectors, as text-embeddings-inference returns."""
    return orjson.dumps(quantize(vectors, output_dtype(embedding_type), ranges), option=orjson.OPT_SERIALIZE_NUMPY)
