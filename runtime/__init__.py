"""The torch-free runtime: ``Encoder`` (``INSTRUCTOR.encode`` on an engine bundle), ``INSTRUCTOR`` (InstructorEmbedding
1.0.1's class on one) and ``python -m runtime.encode``.

Names are imported on first use, so ``import runtime`` stays cheap and never pulls an engine library.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Encoder", "EngineError", "INSTRUCTOR", "InstructionTokenizer", "load_manifest"]

_LAZY = {
    "Encoder": "runtime.encoder",
    "INSTRUCTOR": "runtime.instructor",
    "EngineError": "runtime.bundle",
    "load_manifest": "runtime.bundle",
    "InstructionTokenizer": "runtime.tokenization",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'runtime' has no attribute {name!r}")
