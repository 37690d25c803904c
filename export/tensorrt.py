"""ONNX -> TensorRT ``.plan`` for ``python -m export``: the builder itself is the runtime's (torch-free, so that a
worker on another GPU can rebuild: ``runtime.backends.tensorrt_build``); this module adds the install hint and
the parity runner.

The export's parity check runs the plan with the serving runtime's own backend (``runtime.backends.tensorrt``),
so what is verified is what will be served.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from runtime.backends.cuda import current_device
from runtime.backends.tensorrt_build import DEFAULT_TIMING_CACHE, Profile, build_plan
from runtime.deps import MissingDependency, install_hint, require

__all__ = ["DEFAULT_TIMING_CACHE", "Profile", "build_plan", "plan_backend", "require_tensorrt"]


PLAN_NEEDS = "a .plan is a TensorRT engine, built and verified on an NVIDIA GPU with TensorRT"
ON_THE_CPU = "export on the GPU machine, or export NAME.onnx to run on the CPU"


def require_tensorrt() -> Any:
    """TensorRT and a usable CUDA GPU, or ``MissingDependency`` saying what is missing (before the slow part)."""
    try:
        trt = require("tensorrt", "gpu", ".plan engines")
    except MissingDependency as exc:
        raise MissingDependency(f"{PLAN_NEEDS}; this Python has no tensorrt ({install_hint('gpu')}): {ON_THE_CPU}") from exc
    try:
        current_device()
    except (RuntimeError, MissingDependency) as exc:
        raise MissingDependency(f"{PLAN_NEEDS}; no usable CUDA GPU here ({exc}): {ON_THE_CPU}") from exc
    return trt


def plan_backend(plan_path: Path, tensorrt_fields: dict[str, Any], io: dict[str, Any]) -> tuple[Any, str]:
    """The runtime's TensorRT backend on the fresh plan (it also checks the build target recorded for the manifest)."""
    from runtime.backends.tensorrt import TensorRTBackend
    from runtime.bundle import Manifest

    backend = TensorRTBackend(Manifest(engine=plan_path, data={"tensorrt": tensorrt_fields, **io}))
    return backend, f"tensorrt {tensorrt_fields['version']} (runtime.backends.tensorrt)"
