"""Billboard scoring, as upstream ``evaluation/text_evaluation/main.py`` computes it, and its instruction tables."""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.stats import pearsonr

from bench.quality.billboard.data import BillboardTask
from bench.quality.encoders import NO_INSTRUCTIONS, SentenceEncoder

# upstream main.py `definitions`: the instruction each hkunlp model was evaluated with, per task
INSTRUCTIONS: dict[str, dict[str, str]] = {
    "hkunlp/instructor-base": {
        "mscoco": "Represent the image caption: ",
        "cnndm": "Represent a comment: ",
        "mt": "Represent the statement: ",
    },
    "hkunlp/instructor-large": {
        "mscoco": "Represent the caption: ",
        "cnndm": "Represent a comment: ",
        "mt": "Represent the statement: ",
    },
    "hkunlp/instructor-xl": {
        "mscoco": "Represent the image caption: ",
        "cnndm": "Represent a news comment: ",
        "mt": "Represent the translation statement; ",
    },
}
TABLES = (NO_INSTRUCTIONS, *INSTRUCTIONS)


def instruction_for(table: str, task: str) -> str | None:
    """The instruction of ``table`` for ``task``; None for ``none`` (plain strings)."""
    if table == NO_INSTRUCTIONS:
        return None
    if table not in INSTRUCTIONS:
        raise ValueError(f"no Billboard instruction table {table!r} (have: {', '.join(TABLES)})")
    return INSTRUCTIONS[table][task]


def embed(encoder: SentenceEncoder, texts: list[str], instruction: str | None, batch_size: int, progress: bool = True) -> np.ndarray:
    """Unit float64 vectors of ``texts`` (each distinct text encoded once), ``[instruction, text]`` when instructed."""
    unique = list(dict.fromkeys(texts))
    items = unique if instruction is None else [[instruction, t] for t in unique]
    vecs = np.asarray(encoder.encode(items, batch_size=batch_size, show_progress_bar=progress, convert_to_numpy=True), dtype=np.float64)
    vecs /= np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
    where = {t: i for i, t in enumerate(unique)}
    return vecs[[where[t] for t in texts]]


def max_ref_cosine(hyp_vecs: np.ndarray, ref_vecs: list[np.ndarray], hyp_segment: np.ndarray) -> np.ndarray:
    """Each hypothesis's maximum cosine over its own segment's references (all rows unit vectors)."""
    scores = np.empty(len(hyp_vecs))
    for seg, refs in enumerate(ref_vecs):
        rows = np.flatnonzero(hyp_segment == seg)
        if len(rows):
            scores[rows] = (hyp_vecs[rows] @ refs.T).max(axis=1)
    return scores


def evaluate_task(encoder: SentenceEncoder, task: BillboardTask, instruction: str | None, batch_size: int = 32) -> dict[str, Any]:
    """Embed references and hypotheses, score, correlate: the task's summary entry."""
    flat = [r for refs in task.references for r in refs]
    ref_flat = embed(encoder, flat, instruction, batch_size)
    bounds = np.cumsum([0] + [len(refs) for refs in task.references])
    ref_vecs = [ref_flat[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    hyp_vecs = embed(encoder, task.hyps, instruction, batch_size)
    scores = max_ref_cosine(hyp_vecs, ref_vecs, task.hyp_segment)
    result = pearsonr(task.human, scores)
    return {
        "pearson": float(result.statistic),
        "p_value": float(result.pvalue),
        "n": len(task.hyps),
        "segments": len(task.references),
        "references": len(flat),
        "instruction": instruction,
    }
