"""Self-verification of an exported engine against the PyTorch model: per-row cosine and max abs diff, and gates."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from runtime.parity import Parity, compare, gate_failures

__all__ = ["GATES", "GateError", "Parity", "ParityReport", "calibration_inputs", "check_gate", "compare", "run_batches"]

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
    """The gate's failures as sentences (empty when it passes), NaN/inf rows named first."""
    nonfinite = [f"{parity.nonfinite_rows} rows are NaN/inf"] if parity.nonfinite_rows else []
    return nonfinite + gate_failures(parity, gate)


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
