"""Training tokenization: upstream train.py's ``tokenizer(I + x)`` and its instruction count, through the shared tokenizer.

Upstream counts the instruction's tokens on the instruction as written (``tokenizer(I)``, no strip), while
inference (InstructorEmbedding 1.0.1 ``encode``) counts on ``I.strip()``. For the usual ``"...: "`` instruction
the training count is one more: the trailing ``▁`` token, so training also leaves the first text token out of the
pooling. ``tests/fixtures/golden/loss.json`` (computed by the upstream code) confirms it: its loss matches only
with this count. The rule ``n <= 1 -> 0`` applies as at inference.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from runtime.tokenization import Encoded, InstructionTokenizer
from trainer.data import SIDES


class TrainingFeaturizer:
    """Turns MEDI rows into model inputs: the texts ``[queries; positives; negatives]`` in chunks."""

    def __init__(self, tokenizer: InstructionTokenizer, max_length: int, pad_to_max_length: bool = False) -> None:
        self.tok = InstructionTokenizer(tokenizer.path, max_length, tokenizer.do_lower_case, strip=False)
        self.max_length = int(max_length)
        self.pad_to_max_length = pad_to_max_length

    def encode(self, pairs: Sequence[Sequence[str]]) -> Encoded:
        return self.tok.encode([list(p) for p in pairs])

    def __call__(self, rows: Sequence[dict[str, Any]], chunk_size: int | None = None) -> list[dict[str, torch.Tensor]]:
        """Tensors for ``forward``, in chunks of ``chunk_size`` texts (one chunk when None), each padded to its longest."""
        pairs = [row[side] for side in SIDES for row in rows]
        encoded = self.encode(pairs)
        size = chunk_size or len(pairs)
        chunks = []
        for start in range(0, len(pairs), size):
            part = encoded.take(slice(start, start + size))
            arrays = self.tok.pad(part, self.max_length if self.pad_to_max_length else None)
            chunks.append({k: torch.from_numpy(v) for k, v in arrays.items()})
        return chunks
