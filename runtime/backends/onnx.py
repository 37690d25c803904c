"""ONNX Runtime backend: the CPU execution provider, or CUDA with IO binding when onnxruntime-gpu sees a GPU."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from runtime.backends.cuda import device_index
from runtime.batching import GPU_MAX_TOKENS
from runtime.bundle import INPUT_NAMES, OUTPUT_NAME, EngineError, Manifest
from runtime.manifest_schema import RECORD_KEY

OPT_LEVELS = ("disable", "basic", "extended", "all")


@dataclass
class OnnxOptions:
    """Session options. The defaults suit batches whose shape changes every call (length-sorted batching)."""

    intra_op_threads: int = 0  # 0: ONNX Runtime's default, one thread per physical core
    graph_optimization: str = "all"  # the exporter already fused the graph; "all" adds layout-level rewrites
    mem_arena: bool = True  # reuse freed buffers between batches instead of returning them to the OS
    allow_spinning: bool = False  # idle workers sleep: the tokenizer thread needs those cores more than ORT needs the latency


def _session_options(opts: OnnxOptions):  # -> ort.SessionOptions
    import onnxruntime as ort

    if opts.graph_optimization not in OPT_LEVELS:
        raise ValueError(f"graph_optimization must be one of {OPT_LEVELS}, got {opts.graph_optimization!r}")
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = int(opts.intra_op_threads)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[opts.graph_optimization]
    so.enable_cpu_mem_arena = bool(opts.mem_arena)
    so.enable_mem_pattern = False  # memory patterns only pay off when every run has the same shapes
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if opts.allow_spinning else "0")
    return so


def picks_cuda(device: str | None) -> bool:
    """Whether an engine opened on ``device`` runs on CUDA: when asked to, or by default when onnxruntime-gpu is there."""
    import onnxruntime as ort

    if device is not None:
        return device.startswith("cuda")
    return "CUDAExecutionProvider" in ort.get_available_providers()


class OnnxBackend:
    """One ``InferenceSession`` over the bundle's ``.onnx`` file."""

    def __init__(self, manifest: Manifest, device: str | None = None, options: OnnxOptions | None = None) -> None:
        import onnxruntime as ort

        self.options = options or OnnxOptions()
        available = ort.get_available_providers()
        want_cuda = device is not None and device.startswith("cuda")
        if want_cuda and "CUDAExecutionProvider" not in available:
            raise EngineError(
                f"{manifest.engine}: device={device!r} needs onnxruntime-gpu with CUDA (this onnxruntime has {available})"
            )
        use_cuda = picks_cuda(device)
        self.device_id = device_index(device)
        providers: list = ["CPUExecutionProvider"]
        if use_cuda:
            providers = [("CUDAExecutionProvider", {"device_id": self.device_id}), "CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(str(manifest.engine), _session_options(self.options), providers=providers)
        except Exception as exc:  # ORT raises its own exception types for unreadable / invalid models
            raise EngineError(f"{manifest.engine}: ONNX Runtime cannot load the engine ({exc})") from exc
        output = self.session.get_outputs()[0]
        manifest.check_engine(
            [i.name for i in self.session.get_inputs()],
            output.name,
            output.shape[-1] if output.shape else None,
            self.session.get_modelmeta().custom_metadata_map.get(RECORD_KEY),
            carries_record=True,
        )
        self.use_cuda = "CUDAExecutionProvider" in self.session.get_providers()
        if want_cuda and not self.use_cuda:
            raise EngineError(f"{manifest.engine}: the CUDA execution provider did not start (no usable GPU?)")
        self.device = "cuda" if self.use_cuda else "cpu"
        self.name = f"onnxruntime:{self.session.get_providers()[0]}"
        self.max_rows = None
        self.default_max_tokens = GPU_MAX_TOKENS if self.use_cuda else None

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        if not self.use_cuda:
            return self.session.run([OUTPUT_NAME], feeds)[0]
        import onnxruntime as ort

        # IO binding: inputs copied to the GPU once, output produced on the GPU and copied back once.
        binding = self.session.io_binding()
        for name in INPUT_NAMES:
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(feeds[name], "cuda", self.device_id))
        binding.bind_output(OUTPUT_NAME, "cuda", self.device_id)
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]

    def close(self) -> None:
        self.session = None
