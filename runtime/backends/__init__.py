"""Engine backends: each runs padded int64 feeds through one kind of engine and returns float32 ``[rows, dim]``.

``open_backend`` picks the backend from the bundle's kind; each backend imports its engine library lazily, so a
CPU-only install never touches TensorRT, CUDA or (outside ``.pt2`` engines) torch.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from runtime.bundle import EngineError, Manifest


class Backend(Protocol):
    name: str  # e.g. "onnxruntime:CPUExecutionProvider"
    device: str  # "cpu" or "cuda"
    max_rows: int | None  # the engine's own batch limit (a TensorRT profile), None when unbounded
    default_max_tokens: int | None  # the token budget that suits the device (GPU-sized on CUDA); None: the encoder's

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray: ...

    def close(self) -> None: ...


def open_backend(manifest: Manifest, device: str | None = None, **options: object) -> Backend:
    """The backend for ``manifest``'s engine; ``options`` go to it (see ``OnnxOptions`` for ONNX Runtime; a
    ``.pt2`` takes ``cuda_graphs``)."""
    if device not in (None, "cpu", "cuda") and not str(device).startswith("cuda:"):
        raise ValueError(f"device must be None, 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if manifest.kind == "onnx":
        from runtime.backends.onnx import OnnxBackend, OnnxOptions

        return OnnxBackend(manifest, device, OnnxOptions(**options))  # type: ignore[arg-type]
    if manifest.kind == "tensorrt":
        if device == "cpu":
            raise EngineError(f"{manifest.engine}: a TensorRT engine runs on a CUDA GPU, not on device='cpu'")
        if options:
            raise ValueError(f"options {sorted(options)} apply to ONNX Runtime engines only")
        from runtime.backends.tensorrt import TensorRTBackend

        return TensorRTBackend(manifest, device)
    if manifest.kind == "pt2":
        if set(options) - {"cuda_graphs"}:
            raise ValueError(f"options {sorted(set(options) - {'cuda_graphs'})} apply to ONNX Runtime engines only")
        from runtime.backends.pt2 import Pt2Backend

        return Pt2Backend(manifest, device, cuda_graphs=bool(options.get("cuda_graphs", False)))
    raise EngineError(f"{manifest.engine}: no backend for engine kind {manifest.kind!r}")
