"""TensorRT backend (TensorRT 10 API): a deserialized ``.plan``, CUDA buffers from cuda-python, no torch.

A ``.plan`` only runs on the GPU architecture and the TensorRT version it was built with. The manifest records
both (``tensorrt.version``, ``tensorrt.compute_capability``); a mismatch is refused with ``EngineError`` before
TensorRT is asked to deserialize, and the message says to rebuild from the bundle's ``PATH.onnx``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from runtime.backends.cuda import DeviceBuffer, check, cudart, current_device, device_index
from runtime.batching import GPU_MAX_TOKENS
from runtime.bundle import INPUT_NAMES, OUTPUT_NAME, EngineError, Manifest, source_onnx_path
from runtime.deps import require


def build_target(manifest: Manifest) -> tuple[str, str]:
    """(TensorRT version, compute capability "major.minor") the ``.plan`` was built for, from the manifest."""
    info = manifest.data.get("tensorrt")
    if not isinstance(info, dict) or "version" not in info or "compute_capability" not in info:
        raise EngineError(
            f"{manifest.engine}: the manifest lacks tensorrt.version / tensorrt.compute_capability "
            "(re-export the .plan with `python -m export`)"
        )
    cc = info["compute_capability"]
    if isinstance(cc, (list, tuple)):
        cc = ".".join(str(int(x)) for x in cc)
    return str(info["version"]), str(cc)


class PlanTargetMismatch(EngineError):
    """A ``.plan`` built for another GPU architecture or TensorRT version (rebuildable from the bundle's ONNX)."""


def check_build_target(manifest: Manifest, trt_version: str, compute_capability: str) -> None:
    """Refuse a ``.plan`` built for another TensorRT or another GPU architecture."""
    want_version, want_cc = build_target(manifest)
    rebuild = f"rebuild it here: python -m export CHECKPOINT --out {manifest.engine} (its graph is in {source_onnx_path(manifest.engine)})"
    if want_version != trt_version:
        raise PlanTargetMismatch(f"{manifest.engine}: built with TensorRT {want_version}, this is TensorRT {trt_version}; {rebuild}")
    if want_cc != compute_capability:
        raise PlanTargetMismatch(
            f"{manifest.engine}: built for compute capability {want_cc}, this GPU is {compute_capability}; {rebuild}"
        )


class TensorRTBackend:
    """Runs a TensorRT 10 engine with dynamic batch and sequence (one optimization profile)."""

    def __init__(self, manifest: Manifest, device: str | None = None) -> None:
        trt = require("tensorrt", "gpu", f"{manifest.engine}: a TensorRT engine")
        self.cudart = cudart()
        self.device_id = device_index(device)
        try:
            check(self.cudart.cudaSetDevice(self.device_id), "cudaSetDevice")
            target = current_device(self.device_id)
        except RuntimeError as exc:
            raise EngineError(f"{manifest.engine}: no usable CUDA GPU {self.device_id} ({exc})") from exc
        check_build_target(manifest, trt.__version__, target["compute_capability"])

        self.trt = trt
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(manifest.engine.read_bytes())
        if self.engine is None:
            raise EngineError(f"{manifest.engine}: TensorRT could not deserialize the engine (corrupt file?)")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        expected = [entry["name"] for entry in manifest.data.get("inputs", [])] or list(INPUT_NAMES)
        outputs = [entry["name"] for entry in manifest.data.get("outputs", [])] or [OUTPUT_NAME]
        if sorted(names) != sorted(expected + outputs):
            raise EngineError(f"{manifest.engine}: engine tensors {names}, the manifest says {expected + outputs}")
        self.input_names = expected
        self.output_name = outputs[0]
        manifest.check_engine(expected, self.output_name, int(self.engine.get_tensor_shape(self.output_name)[-1]))
        self.dtypes = {name: np.dtype(trt.nptype(self.engine.get_tensor_dtype(name))) for name in names}
        self.context = self.engine.create_execution_context()
        # the profile's max batch: the batch planner must not exceed it
        _, _, max_shape = self.engine.get_tensor_profile_shape(self.input_names[0], 0)
        self.max_rows = int(max_shape[0])
        self.default_max_tokens = GPU_MAX_TOKENS
        self.stream = check(self.cudart.cudaStreamCreate(), "cudaStreamCreate")
        self.buffers = {name: DeviceBuffer() for name in names}
        self.device = "cuda"
        self.name = f"tensorrt:{trt.__version__}"

    def _copy(self, dst: int, src: int, nbytes: int, kind: Any) -> None:
        check(self.cudart.cudaMemcpyAsync(dst, src, nbytes, kind, self.stream), "cudaMemcpyAsync")

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        kinds = self.cudart.cudaMemcpyKind
        hosts = {name: np.ascontiguousarray(feeds[name], dtype=self.dtypes[name]) for name in self.input_names}
        for name, host in hosts.items():
            if not self.context.set_input_shape(name, tuple(host.shape)):
                raise ValueError(f"TensorRT refused shape {host.shape} for {name} (outside the engine's profile)")
            ptr = self.buffers[name].ensure(max(host.nbytes, 1))
            self._copy(ptr, host.ctypes.data, host.nbytes, kinds.cudaMemcpyHostToDevice)
            self.context.set_tensor_address(name, ptr)
        out = np.empty(tuple(self.context.get_tensor_shape(self.output_name)), dtype=self.dtypes[self.output_name])
        out_ptr = self.buffers[self.output_name].ensure(max(out.nbytes, 1))
        self.context.set_tensor_address(self.output_name, out_ptr)
        if not self.context.execute_async_v3(stream_handle=int(self.stream)):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        self._copy(out.ctypes.data, out_ptr, out.nbytes, kinds.cudaMemcpyDeviceToHost)
        # host arrays must outlive the async copies: synchronize before they go out of scope
        check(self.cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        return out.astype(np.float32, copy=False)

    def close(self) -> None:
        for buf in getattr(self, "buffers", {}).values():
            buf.free()
        if getattr(self, "stream", None) is not None:
            self.cudart.cudaStreamDestroy(self.stream)
            self.stream = None
        self.context = None
        self.engine = None
