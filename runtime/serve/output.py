"""Vectors into response bodies: the one place that decides how a vector is written.

``encoding_format`` is OpenAI's: ``float`` (a JSON array) or ``base64`` (the little-endian float32 bytes, which the
official client decodes with ``numpy.frombuffer(..., "float32")``). A later output type (int8, binary, ...) goes
into ``encode_rows`` and nowhere else.
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
import orjson

ENCODING_FORMATS = ("float", "base64")
_LE_FLOAT32 = np.dtype("<f4")


def encode_rows(vectors: np.ndarray, encoding_format: str) -> list[Any]:
    """One JSON-ready value per row: a float32 numpy row (orjson writes it as an array) or a base64 string."""
    if encoding_format == "float":
        return list(np.ascontiguousarray(vectors, dtype=np.float32))
    if encoding_format == "base64":
        raw = np.ascontiguousarray(vectors, dtype=_LE_FLOAT32)
        return [base64.b64encode(row.tobytes()).decode("ascii") for row in raw]
    raise ValueError(f"encoding_format must be one of {ENCODING_FORMATS}, got {encoding_format!r}")


def openai_body(vectors: np.ndarray, encoding_format: str, model: str, tokens: int) -> bytes:
    """The body of ``POST /v1/embeddings``: ``data[i]`` in input order, ``model`` and ``usage``."""
    data = [{"object": "embedding", "index": i, "embedding": row} for i, row in enumerate(encode_rows(vectors, encoding_format))]
    body = {"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
    return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)


def tei_body(vectors: np.ndarray) -> bytes:
    """The body of ``POST /embed``: a JSON array of vectors, as text-embeddings-inference returns."""
    return orjson.dumps(np.ascontiguousarray(vectors, dtype=np.float32), option=orjson.OPT_SERIALIZE_NUMPY)
