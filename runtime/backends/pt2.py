"""``.pt2`` backend: an AOTInductor package (``torch.export`` + AOTInductor) run by the torch it was built with.

This is the one backend that needs torch, so torch is imported here only, when a ``.pt2`` is opened: the light
install never imports it. A package is compiled code for one torch build and one device kind (and, on CUDA, one
GPU architecture). The manifest records them (``pt2.torch``, ``pt2.device``, ``pt2.compute_capability``) and a
mismatch is refused with ``EngineError`` before the package is loaded.

On CUDA every call stages the batch in pinned host buffers (grown as batches grow, never shrunk), copies it to the
GPU with non-blocking copies on the backend's own stream, runs the package on that stream and copies the vectors
back the same way: one synchronization per batch. Tokenizing overlaps with it in the encoder's producer thread.
Engines whose manifest says ``tf32_islands`` (fp16/bf16 built for CUDA) run their fp32 matmuls (the FF output
projection, Dense) with TF32 tensor cores during the call, as TensorRT and ONNX Runtime's CUDA EP do for fp32
layers of fp16 engines; the process's own setting is restored after each call.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np

from runtime.backends.cuda import device_index
from runtime.batching import GPU_MAX_TOKENS
from runtime.bundle import INPUT_NAMES, OUTPUT_NAME, EngineError, Manifest
from runtime.deps import MissingDependency


class Pt2TargetMismatch(EngineError):
    """A ``.pt2`` built for another torch build, device kind or GPU architecture (re-export it where it runs)."""


def build_target(device: str) -> dict[str, str]:
    """What a package compiled with this torch for ``device`` is tied to (recorded in the manifest at export)."""
    import torch

    kind = "cuda" if device.startswith("cuda") else "cpu"
    target = {"torch": torch.__version__, "device": kind}
    if kind == "cuda":
        index = device_index(device)
        major, minor = torch.cuda.get_device_capability(index)
        target.update(
            compute_capability=f"{major}.{minor}", device_name=torch.cuda.get_device_name(index), cuda=str(torch.version.cuda)
        )
    return target


def recorded_target(manifest: Manifest) -> dict[str, Any]:
    """The manifest's ``pt2`` fields, checked for what the backend needs."""
    info = manifest.data.get("pt2")
    if not isinstance(info, dict) or not isinstance(info.get("torch"), str) or info.get("device") not in ("cpu", "cuda"):
        raise EngineError(f"{manifest.engine}: the manifest lacks pt2.torch / pt2.device (re-export the .pt2 with `python -m export`)")
    return info


def check_target(manifest: Manifest, built: dict[str, Any], here: dict[str, str]) -> None:
    """Refuse a package built with another torch, for another device kind, or for another GPU architecture."""

    def describe(t: dict[str, Any]) -> str:
        gpu = f" (compute capability {t.get('compute_capability')})" if t["device"] == "cuda" else ""
        return f"torch {t['torch']} on {t['device']}{gpu}"

    same = built["torch"] == here["torch"] and built["device"] == here["device"]
    if same and here["device"] == "cuda":
        same = str(built.get("compute_capability")) == here["compute_capability"]
    if not same:
        raise Pt2TargetMismatch(
            f"{manifest.engine}: built with {describe(built)}, this is {describe(here)}; a .pt2 runs only where it was "
            f"built: re-export it here (python -m export CHECKPOINT --out {manifest.engine} --device {here['device']})"
        )


def _import_torch(manifest: Manifest, built: dict[str, Any]) -> Any:
    try:
        import torch
    except ImportError as exc:
        raise MissingDependency(
            f"{manifest.engine}: a .pt2 engine runs on torch, which is not installed ({exc}); it was built with "
            f"torch {built['torch']}: install that version, or use the .onnx engine"
        ) from exc
    return torch


class Pt2Backend:
    """Runs an AOTInductor package with dynamic batch and sequence on the CPU or one CUDA GPU."""

    def __init__(self, manifest: Manifest, device: str | None = None) -> None:
        built = recorded_target(manifest)
        torch = _import_torch(manifest, built)
        device = device or built["device"]
        on_cuda = device.startswith("cuda")
        if on_cuda and not torch.cuda.is_available():
            raise EngineError(f"{manifest.engine}: device={device!r}, but torch {torch.__version__} sees no usable CUDA GPU")
        self.index = device_index(device) if on_cuda else -1
        check_target(manifest, built, build_target(device))
        self.torch = torch
        try:
            self.model = torch._inductor.aoti_load_package(str(manifest.engine), device_index=self.index)
        except Exception as exc:  # torch raises RuntimeError subclasses of its own for unreadable packages
            raise EngineError(f"{manifest.engine}: torch cannot load the AOTInductor package ({exc})") from exc
        self.device = "cuda" if on_cuda else "cpu"
        self.torch_device = torch.device("cuda", self.index) if on_cuda else torch.device("cpu")
        self.max_rows = int(built["max_batch"]) if isinstance(built.get("max_batch"), int) else None
        self.default_max_tokens = GPU_MAX_TOKENS if on_cuda else None
        self.tf32 = on_cuda and bool(built.get("tf32_islands"))
        self.stream = torch.cuda.Stream(self.torch_device) if on_cuda else None
        self.pinned: dict[str, Any] = {}
        self.name = f"torch-aoti:{torch.__version__}:{self.device}"

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        arrays = [np.ascontiguousarray(feeds[name], dtype=np.int64) for name in INPUT_NAMES]
        torch = self.torch
        if self.stream is None:
            with torch.inference_mode():
                return self.model(*(torch.from_numpy(a) for a in arrays)).numpy()
        with torch.cuda.device(self.torch_device), torch.cuda.stream(self.stream), torch.inference_mode(), self._tf32():
            inputs = [self._staged(name, a).to(self.torch_device, non_blocking=True) for name, a in zip(INPUT_NAMES, arrays)]
            out = self.model(*inputs)
            host = self._pinned(OUTPUT_NAME, tuple(out.shape), torch.float32)
            host.copy_(out, non_blocking=True)
            self.stream.synchronize()  # the pinned buffers are reused by the next call
        return host.numpy().copy()

    def _pinned(self, key: str, shape: tuple[int, ...], dtype: Any) -> Any:
        """A view of shape ``shape`` into this key's pinned host buffer (grown when too small)."""
        count = int(np.prod(shape))
        buffer = self.pinned.get(key)
        if buffer is None or buffer.numel() < count:
            size = max(count, 2 * buffer.numel() if buffer is not None else 0)
            buffer = self.pinned[key] = self.torch.empty(size, dtype=dtype, pin_memory=True)
        return buffer[:count].view(shape)

    def _staged(self, key: str, array: np.ndarray) -> Any:
        host = self._pinned(key, array.shape, self.torch.int64)
        host.copy_(self.torch.from_numpy(array))
        return host

    @contextmanager
    def _tf32(self) -> Iterator[None]:
        if not self.tf32:
            yield
            return
        before = self.torch.get_float32_matmul_precision()
        self.torch.set_float32_matmul_precision("high")
        try:
            yield
        finally:
            self.torch.set_float32_matmul_precision(before)

    def close(self) -> None:
        self.model = None
        self.pinned.clear()
