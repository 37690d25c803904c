"""Demonstration selection as upstream ``evaluation/prompt_retrieval/two_steps.py`` ``prompt_retrieval`` does it.

For one test example: rank the annotated pool by cosine with the test embedding; walk it from the most similar
down, skipping a duplicate of the test input (two_steps only) and any example longer than the per-example cap;
add each example's token cost to the running prompt length (which starts at the test input's own cost) and stop
at the first that would pass the budget. The prompt lists the selected examples least similar first, so the
most similar sits right before the test input.

One deliberate difference: upstream skips a duplicate when its float32 cosine equals 1 exactly, which float
rounding makes true for only about half of the exact duplicates (92 of 200 random 384-d vectors against
themselves in torch); here a cosine within ``IDENTICAL_TOL`` of 1 counts as a duplicate.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IDENTICAL_TOL = 1e-6


@dataclass(frozen=True)
class Budget:
    """Upstream's packing limits: ``maximum_input_len``, ``single_context_example_len``, the cosine-1 skip."""

    max_tokens: int
    per_example_cap: int | None = None
    skip_identical: bool = False


def cosine_scores(test_vec: np.ndarray, pool: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """float32 cosine of one vector with every pool row (``torch.nn.CosineSimilarity(dim=1, eps=1e-6)``)."""
    test_vec = np.asarray(test_vec, dtype=np.float32)
    pool = np.asarray(pool, dtype=np.float32)
    dots = pool @ test_vec
    norms = np.maximum(np.linalg.norm(pool, axis=1) * np.float32(np.linalg.norm(test_vec)), np.float32(eps))
    return (dots / norms).astype(np.float32)


def select(scores: np.ndarray, costs: np.ndarray, start_cost: int, budget: Budget) -> list[int]:
    """Pool indices in prompt order (least similar first, most similar last) for one test example."""
    order = np.argsort(scores)  # ascending, numpy's default sort, as upstream
    chosen: list[int] = []
    total = start_cost
    for idx in order[::-1]:
        if budget.skip_identical and scores[idx] >= 1 - IDENTICAL_TOL:
            continue
        if budget.per_example_cap is not None and costs[idx] > budget.per_example_cap:
            continue
        total += int(costs[idx])
        if total > budget.max_tokens:
            break
        chosen.append(int(idx))
    return chosen[::-1]
