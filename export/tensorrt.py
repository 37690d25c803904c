"""ONNX -> TensorRT ``.plan`` for ``python -m export``: the builder itself is the runtime's (torch-free, so that a
worker on another GPU can rebuild: ``runtime.backends.tensorrt_build``); this module adds the install hint and
the parity runner.

The export's parity check runs the plan with the serving runtime's own backend (``runtime.backends.tensorrt``),
so what is verified is what will be served.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from runtime.backends.tensorrt_build import DEFAULT_TIMING_CACHE, Profile, build_plan

__all__ = ["DEFAULT_TIMING_CACHE", "INSTALL_HINT", "MissingDependency", "Profile", "build_plan", "plan_backend", "require_tensorrt"]

INSTALL_HINT = "pip install 'instructor-stack[gpu]'"


class MissingDependency(RuntimeError):
    """An optional dependency that this export needs is not installed; the message says what to install."""


def require_tensorrt() -> Any:
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise MissingDependency(f"TensorRT is not installed ({exc}); for .plan engines run: {INSTALL_HINT}") from exc
    try:
        from runtime.backends.tensorrt_build import current_device

        current_device()
    except RuntimeError as exc:
        raise MissingDependency(f"TensorRT engines need a CUDA GPU and cuda-python ({exc}; {INSTALL_HINT})") from exc
    return trt


def plan_backend(plan_path: Path, tensorrt_fields: dict[str, Any], io: dict[str, Any]) -> tuple[Any, str]:
    """The runtime's TensorRT backend on the fresh plan (it also checks the build target recorded for the manifest)."""
    from runtime.backends.tensorrt import TensorRTBackend
    from runtime.bundle import Manifest

    backend = TensorRTBackend(Manifest(engine=plan_path, data={"tensorrt": tensorrt_fields, **io}))
    return backend, f"tensorrt {tensorrt_fields['version']} (runtime.backends.tensorrt)"
