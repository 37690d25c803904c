"""Training, the PyTorch INSTRUCTOR model (the export source) and InstructorEmbedding 1.0.1's class on it.

``INSTRUCTOR`` and ``InstructorModel`` are imported on first use, so that ``python -m trainer --help`` and its
option errors answer without importing torch, and a missing torch is reported as such (exit 3), not a traceback.
"""

from __future__ import annotations

from typing import Any

__all__ = ["INSTRUCTOR", "InstructorModel"]


def __getattr__(name: str) -> Any:
    if name == "INSTRUCTOR":
        from trainer.instructor import INSTRUCTOR

        return INSTRUCTOR
    if name == "InstructorModel":
        from trainer.model import InstructorModel

        return InstructorModel
    raise AttributeError(f"module 'trainer' has no attribute {name!r}")
