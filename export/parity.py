"""Self-verification of an exported engine against the PyTorch model: per-row cosine and max abs diff, and gates."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

# Defaults; `python -m export --min-cos/--max-abs` override them.
GATES: dict[str, dict[str, float]] = {
    "fp32": {"max_abs": 1e-5},
    "fp16": {"min_cos": 0.999},
    "bf16": {"min_cos": 0.999},
    "int8": {"min_cos": 0.99},
}

CALIBRATION_FILE = Path(__file__).parent / "data" / "calibration.json"


class GateError(RuntimeError):
    """The exported engine does not reproduce the PyTorch model within the gate."""


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


@dataclass(frozen=True)
class ParityReport:
    """An engine measured against the reference under a gate: what the exporter decides on and the manifest keeps."""

    parity: Parity
    reference: str
    runner: str
    batch_size: int
    gate: dict[str, float]
    failures: tuple[str, ...]

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def min_cos(self) -> float:
        return self.parity.min_cos

    def as_dict(self) -> dict[str, Any]:
        """The manifest's ``parity`` field."""
        return {
            **self.parity.as_dict(),
            "reference": self.reference,
            "runner": self.runner,
            "batch_size": self.batch_size,
            "gate": dict(self.gate),
            "passed": self.passed,
            "failures": list(self.failures),
        }


def check_gate(parity: Parity, gate: dict[str, float]) -> list[str]:
    """The gate's failures as sentences (empty when it passes)."""
    failures = []
    if parity.nonfinite_rows:
        failures.append(f"{parity.nonfinite_rows} rows are NaN/inf")
    if "min_cos" in gate and parity.min_cos < gate["min_cos"]:
        failures.append(f"min cosine {parity.min_cos:.6f} < {gate['min_cos']}")
    if "max_abs" in gate and parity.max_abs > gate["max_abs"]:
        failures.append(f"max abs diff {parity.max_abs:.3g} > {gate['max_abs']}")
    return failures


def calibration_inputs(max_seq_length: int, max_batch: int) -> list[Any]:
    """Golden probe inputs, real sentences, and ``max_batch`` inputs that fill ``max_seq_length``."""
    data = json.loads(CALIBRATION_FILE.read_text(encoding="utf-8"))
    words = "the committee reviewed annual budget approved several programs for schools hospitals roads".split()
    long_text = " ".join(words[i % len(words)] for i in range(max_seq_length * 2))
    long_rows = [["Represent the document for retrieval: ", f"{i} {long_text}"] for i in range(max_batch)]
    return list(data["golden"]) + list(data["real"]) + long_rows


def run_batches(
    run: Callable[[dict[str, np.ndarray]], np.ndarray],
    tokenizer: Any,
    inputs: Sequence[Any],
    batch_size: int,
) -> np.ndarray:
    """Run an engine callable over ``inputs`` in batches padded to each batch's longest row."""
    out = [run(tokenizer(inputs[i : i + batch_size])) for i in range(0, len(inputs), batch_size)]
    return np.concatenate(out, axis=0)
