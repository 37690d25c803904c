"""Length-sorted batches under a token budget, so that the engine computes on real tokens, not on padding.

Within a window of rows (a few thousand), rows are sorted by token count, longest first, and cut into batches
that hold at most ``max_rows`` rows and at most ``max_tokens`` padded tokens (rows x the batch's longest row), and
whose padding stays under ``max_padding`` of the batch. Neighbours in the sorted order have nearly the same length,
so batches fill up before the padding rule cuts them; the rule matters at gaps in the length distribution (a few
long outliers among short rows), where a plain row cap would pad 31 short rows to the longest one. Longest-first
puts the largest batch at the start, where a memory limit shows at once. A row longer than the budget gets a batch
of its own.

An engine may compute some widths faster than narrower ones: kernels that tile the sequence in blocks (AMX tiles
hold 16 rows) run a width off the block with tails that cost more than the padding that avoids them. OpenVINO bf16
on an AMX Xeon, MiniLM, 32 rows: 255 tokens 301 ms, 256 tokens 247 ms; 63 tokens 64 ms, 64 tokens 49 ms. Such an
engine's rows are planned and padded at their ``aligned`` width: the length rounded up to the engine's multiple
(measured per engine and CPU by ``runtime.cpu_engines.race``), never past ``max_seq_length``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

# The default token budget of a GPU backend (a backend's ``default_max_tokens``): 128 rows of 512 tokens, where a
# T5-large batch keeps a datacenter GPU's tensor cores busy; the CPU default (``runtime.encoder``) is 4x smaller.
GPU_MAX_TOKENS = 65536


@dataclass
class BatchStats:
    """Counts over encoded rows; ``padding_waste`` is the share of computed positions that were padding."""

    rows: int = 0
    tokens: int = 0  # real tokens (instruction + text + special tokens), after truncation
    padded_tokens: int = 0  # positions the engine computed: sum over batches of rows x longest row
    truncated: int = 0  # rows cut at max_seq_length
    batches: int = 0
    chunks: int = 0  # engine inputs: the rows, or with long_text="chunk" their chunks
    split_rows: int = 0  # rows longer than max_seq_length cut into several chunks (long_text="chunk")

    @property
    def padding_waste(self) -> float:
        return 1.0 - self.tokens / self.padded_tokens if self.padded_tokens else 0.0

    def __add__(self, other: "BatchStats") -> "BatchStats":
        return BatchStats(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    def as_dict(self) -> dict[str, float | int]:
        out: dict[str, float | int] = {f.name: getattr(self, f.name) for f in fields(self)}
        out["padding_waste"] = round(self.padding_waste, 6)
        return out


def plan_batches(lengths: np.ndarray, max_rows: int, max_tokens: int, max_padding: float = 0.05) -> list[np.ndarray]:
    """Row indices of each batch (longest rows first); every row appears in exactly one batch.

    A batch closes when it holds ``max_rows`` rows, when one more row would pass ``max_tokens`` padded tokens, or
    when one more row would make more than ``max_padding`` of the batch padding (a short row after long ones).
    """
    if max_rows < 1 or max_tokens < 1 or not 0.0 <= max_padding < 1.0:
        raise ValueError(f"need max_rows >= 1, max_tokens >= 1, 0 <= max_padding < 1; got {max_rows}, {max_tokens}, {max_padding}")
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(-lengths, kind="stable")
    batches: list[np.ndarray] = []
    start, real, width = 0, 0, 0
    for pos, row in enumerate(order.tolist()):
        n = pos - start
        length = int(lengths[row])
        if n:
            fits = n < max_rows and (n + 1) * width <= max_tokens
            if fits and (n + 1) * width - (real + length) <= max_padding * (n + 1) * width:
                real += length
                continue
            batches.append(order[start:pos])
        start, real, width = pos, length, max(length, 1)
    if len(order):
        batches.append(order[start:])
    return batches


def aligned(lengths: np.ndarray, multiple: int, cap: int) -> np.ndarray:
    """Each row's width in an engine that prefers widths in multiples of ``multiple``: its length rounded up, but
    not past ``cap`` (the positions the engine was checked for) unless the row is already longer."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if multiple <= 1:
        return lengths
    return np.maximum(lengths, np.minimum(-(-lengths // multiple) * multiple, cap))


def widen(feeds: dict[str, np.ndarray], multiple: int, cap: int, pad_id: int) -> dict[str, np.ndarray]:
    """A padded batch re-padded to its ``aligned`` width (the race's batches, built before a multiple is known)."""
    width = feeds["input_ids"].shape[1]
    extra = int(aligned(np.array([width]), multiple, cap)[0]) - width
    if extra <= 0:
        return feeds
    return {**feeds,
            "input_ids": np.pad(feeds["input_ids"], ((0, 0), (0, extra)), constant_values=pad_id),
            "attention_mask": np.pad(feeds["attention_mask"], ((0, 0), (0, extra)))}


def padded_size(lengths: np.ndarray, batches: list[np.ndarray]) -> int:
    """Positions computed for ``batches``: each batch pads to its own longest row."""
    return int(sum(len(b) * int(lengths[b].max()) for b in batches if len(b)))
