"""Optional dependencies: one exception and one message for every extra that the light install leaves out."""

from __future__ import annotations

import importlib
from types import ModuleType


class MissingDependency(RuntimeError):
    """An optional package this feature needs is not installed; the message says which extra installs it."""


def install_hint(extra: str) -> str:
    return f"pip install 'instructor-stack[{extra}]'"


def require(module: str, extra: str, needed_for: str) -> ModuleType:
    """``module`` imported, or ``MissingDependency`` naming what needs it and the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependency(f"{needed_for} needs {module.split('.')[0]} ({exc}): {install_hint(extra)}") from exc
