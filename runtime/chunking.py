"""Long texts as overlapping windows (``long_text="chunk"``), each repeating the instruction, and back to one vector.

A row whose tokens fit in ``max_seq_length`` is one chunk: the very ids truncation gives, and the very vector. A
longer row is ``prefix + content + tail``: ``prefix`` the positions the pooling leaves out (the instruction's
tokens; at least the tokenizer's leading special tokens, e.g. BERT's [CLS]), ``tail`` its trailing special tokens
(T5's ``</s>``, BERT's [SEP]). The content is cut into windows of ``W = max_seq_length - len(prefix) - len(tail)``
tokens, consecutive windows sharing ``overlap`` tokens, the last one ending at the content's end; each chunk is
``prefix + window + tail`` with the row's instruction count, so the instruction conditions every chunk and stays
out of every chunk's mean. A chunk's span is ``[start, end)`` of its window in the row's whole token sequence.

``combine`` makes the row's vector from its chunks' (one rule, ``pooling``):
- ``"mean"`` (default): the mean of the chunk vectors weighted by the tokens each chunk pooled (its window and
  pooled special tokens; overlapping tokens count in both chunks), L2-normalized again when the model normalizes;
- ``"max"``: the element-wise maximum of the chunk vectors, L2-normalized again likewise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from runtime.tokenization import Encoded

LONG_TEXT = ("truncate", "chunk")
POOLING = ("mean", "max")
DEFAULT_OVERLAP = 32


@dataclass
class Chunks:
    """Every row's chunks, rows in order: what the engine runs, and where each chunk came from."""

    encoded: Encoded  # one entry per chunk
    row: np.ndarray  # int64 [chunks]: the row each chunk belongs to
    index: np.ndarray  # int64 [chunks]: its number within that row
    span: np.ndarray  # int64 [chunks, 2]: [start, end) of its window in the row's whole token sequence
    weight: np.ndarray  # float64 [chunks]: tokens it pooled

    @property
    def split_rows(self) -> int:
        """Rows longer than one window (cut into two or more chunks)."""
        return int(np.count_nonzero(self.index == 1))


class WindowTooSmall(ValueError):
    """A row whose instruction leaves windows no longer than the overlap. ``row``: its position among the rows
    split; ``item``: that row's input, when the caller knows it (``runtime.Encoder`` sets it); ``reason``: why."""

    def __init__(self, row: int, reason: str) -> None:
        super().__init__(f"input {row}: {reason}")
        self.row, self.reason = row, reason
        self.item: Any = None


def max_overlap(max_len: int, prefix: int, tail: int) -> int:
    """The largest overlap that still moves every window on by a token: a window (``max_len`` less the ``prefix``
    the pooling leaves out and the ``tail`` special tokens) must be longer than the overlap. Negative: no room."""
    return max_len - prefix - tail - 1


def check_options(long_text: str, overlap: int, pooling: str) -> None:
    if long_text not in LONG_TEXT:
        raise ValueError(f"long_text must be one of {', '.join(LONG_TEXT)}, got {long_text!r}")
    if pooling not in POOLING:
        raise ValueError(f"chunk pooling must be one of {', '.join(POOLING)}, got {pooling!r}")
    if overlap < 0:
        raise ValueError(f"chunk overlap must be >= 0 tokens, got {overlap}")


def split(full: Encoded, max_len: int, overlap: int, head: int, tail: int) -> Chunks:
    """Cut the rows of an untruncated ``Encoded`` into chunks (see the module doc); ``head``/``tail``: special tokens."""
    ids, counts, rows, index, spans, weights = [], [], [], [], [], []
    for r, row_ids in enumerate(full.ids):
        n = int(full.instruction_count[r])
        if len(row_ids) <= max_len:
            starts, prefix, width, content_end = [None], 0, 0, len(row_ids)
        else:
            prefix = max(n, head)
            width = max_len - prefix - tail
            if overlap > max_overlap(max_len, prefix, tail):
                raise WindowTooSmall(r, (
                    f"the instruction takes {prefix} of the {max_len} tokens, which leaves windows of "
                    f"{max(width, 0)} tokens: not more than the {overlap}-token overlap (lower the overlap or shorten the instruction)"
                ))
            content_end = len(row_ids) - tail
            stride = width - overlap
            last = max(content_end - prefix - width, 0)
            starts = list(range(prefix, prefix + last, stride)) + [prefix + last]
        for k, start in enumerate(starts):
            if start is None:  # fits: the row itself
                piece, span = list(row_ids), (0, len(row_ids))
            else:
                end = min(start + width, content_end)
                piece = row_ids[:prefix] + row_ids[start:end] + row_ids[content_end:]
                span = (start, end)
            ids.append(piece)
            counts.append(n)
            rows.append(r)
            index.append(k)
            spans.append(span)
            weights.append(len(piece) - min(n, len(piece)))
    return Chunks(
        encoded=Encoded(ids=ids, instruction_count=np.asarray(counts, dtype=np.int64), truncated=np.zeros(len(ids), bool)),
        row=np.asarray(rows, dtype=np.int64),
        index=np.asarray(index, dtype=np.int64),
        span=np.asarray(spans, dtype=np.int64).reshape(-1, 2),
        weight=np.asarray(weights, dtype=np.float64),
    )


def combine(vectors: np.ndarray, chunks: Chunks, n_rows: int, pooling: str = "mean", normalize: bool = True) -> np.ndarray:
    """One float32 vector per row from its chunks' vectors; a row of one chunk keeps that chunk's vector exactly."""
    if n_rows == 0:
        return np.zeros((0, vectors.shape[1]), dtype=np.float32)
    first = np.flatnonzero(chunks.index == 0)  # chunks are in row order, every row has a chunk 0
    v = vectors.astype(np.float64)
    if pooling == "mean":
        w = chunks.weight
        rows = np.add.reduceat(v * w[:, None], first, axis=0) / np.maximum(np.add.reduceat(w, first), 1e-12)[:, None]
    else:
        rows = np.maximum.reduceat(v, first, axis=0)
    if normalize:
        rows /= np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
    out = rows.astype(np.float32)
    single = np.bincount(chunks.row, minlength=n_rows)[chunks.row] == 1
    out[chunks.row[single]] = vectors[single]
    return out
