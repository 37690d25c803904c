"""Engine vectors against reference vectors, row by row, and the parity gate's rule: one copy for the exporter
(``export.parity``, before a bundle is written) and the runtime (``runtime.cpu_engines``, an engine of an ``auto``
bundle on a CPU the export never saw)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class Parity:
    rows: int
    min_cos: float
    mean_cos: float
    max_abs: float
    nonfinite_rows: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "min_cosine": self.min_cos,
            "mean_cosine": self.mean_cos,
            "max_abs_diff": self.max_abs,
            "nonfinite_rows": self.nonfinite_rows,
        }


def compare(reference: np.ndarray, candidate: np.ndarray) -> Parity:
    """Row-wise comparison; a NaN/inf row counts as cosine -1 so that it always fails a gate."""
    ref = reference.astype(np.float64)
    cand = candidate.astype(np.float64)
    finite = np.isfinite(cand).all(axis=1)
    safe = np.where(finite[:, None], cand, 0.0)
    denom = np.maximum(np.linalg.norm(ref, axis=1) * np.linalg.norm(safe, axis=1), 1e-30)
    cos = np.where(finite, (ref * safe).sum(axis=1) / denom, -1.0)
    # rows the reference itself pools to zero (instruction covers the whole input) compare equal when both are zero
    both_zero = (np.abs(ref).max(axis=1) == 0) & (np.abs(safe).max(axis=1) == 0)
    cos = np.where(both_zero, 1.0, cos)
    abs_diff = np.where(finite[:, None], np.abs(ref - safe), np.inf)
    return Parity(
        rows=len(ref),
        min_cos=float(cos.min()),
        mean_cos=float(cos.mean()),
        max_abs=float(abs_diff.max()),
        nonfinite_rows=int((~finite).sum()),
    )


def gate_failures(parity: Parity, gate: dict[str, float]) -> list[str]:
    """The gate's bounds that ``parity`` misses, as sentences (empty when it passes)."""
    failures = []
    if "min_cos" in gate and parity.min_cos < gate["min_cos"]:
        failures.append(f"min cosine {parity.min_cos:.6f} < {gate['min_cos']}")
    if "max_abs" in gate and parity.max_abs > gate["max_abs"]:
        failures.append(f"max abs diff {parity.max_abs:.3g} > {gate['max_abs']}")
    return failures
