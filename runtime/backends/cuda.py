"""CUDA through cuda-python, shared by the TensorRT backend and the TensorRT builder (no torch): the runtime API,
error checks, device properties, growable device buffers, and the ``cuda:N`` device-name rule."""

from __future__ import annotations

from typing import Any

from runtime.deps import MissingDependency, install_hint


def device_index(device: str | None) -> int:
    """``"cuda:1"`` -> 1; ``"cuda"`` or None -> 0."""
    return int(device.split(":", 1)[1]) if device and ":" in device else 0


def cudart() -> Any:
    """cuda-python's runtime module (``cuda.bindings.runtime`` in cuda-python >= 12.6, ``cuda.cudart`` before)."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        try:
            from cuda import cudart as runtime
        except ImportError as exc:
            raise MissingDependency(f"TensorRT engines need cuda-python ({exc}): {install_hint('gpu')}") from exc
    return runtime


def check(result: Any, what: str) -> Any:
    """cuda-python returns ``(err, *values)``; raise on an error, return the value(s)."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise RuntimeError(f"CUDA {what} failed: {err}")
    return values[0] if len(values) == 1 else tuple(values)


def current_device(index: int = 0) -> dict[str, str]:
    """Compute capability ("major.minor") and name of a CUDA GPU."""
    props = check(cudart().cudaGetDeviceProperties(index), "cudaGetDeviceProperties")
    name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
    return {"compute_capability": f"{props.major}.{props.minor}", "device_name": name.rstrip("\x00")}


class DeviceBuffer:
    """A CUDA allocation that grows when a larger batch arrives (never shrinks)."""

    def __init__(self) -> None:
        self.rt = cudart()
        self.ptr = 0
        self.nbytes = 0

    def ensure(self, nbytes: int) -> int:
        if nbytes > self.nbytes:
            self.free()
            self.ptr = int(check(self.rt.cudaMalloc(nbytes), "cudaMalloc"))
            self.nbytes = nbytes
        return self.ptr

    def free(self) -> None:
        if self.ptr:
            check(self.rt.cudaFree(self.ptr), "cudaFree")
            self.ptr, self.nbytes = 0, 0
