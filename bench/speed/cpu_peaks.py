"""GEMM peaks of the low-precision CPU engines, measured the way ``bench.common.sgemm_peak`` measures fp32.

One n x n x n matrix product (n = 4096) in a one-node graph, best of ``repeats`` after a warm-up, on the engine
library that runs the contenders of that precision:

- ``bf16_gemm_peak``: OpenVINO's CPU plugin, an f32 ``MatMul`` with constant weights compiled with
  ``INFERENCE_PRECISION_HINT=bf16`` (AMX or AVX512-BF16 tiles; oneDNN's brgemm), and torch's bf16 ``matmul``
  (oneDNN) as a second opinion; the peak is the better of the two. None where the CPU has no native bf16.
- ``openvino_int8_gemm_peak``: OpenVINO's int8 ``MatMul`` as NNCF writes it (u8 activations through a
  ``FakeQuantize``, int8 weights with a per-channel dequantize), which the plugin runs as an int8 GEMM (AMX,
  VNNI). ONNX Runtime's ``MatMulInteger`` (``bench.common.igemm_peak``) stays the int8 peak of the ONNX engines.

Each result says which kernel the plugin ran (``exec_type`` from its profiling), so a peak that silently fell
back to f32 shows.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from bench.common import timed


def _openvino_gemm(model: Any, x: np.ndarray, precision: str, threads: int, repeats: int) -> tuple[float, str]:
    """(best seconds of the GEMM node itself, the kernel it ran as) for a one-MatMul OpenVINO model: the node's
    own time from the plugin's profiling, so the conversion of the f32 input (to bf16, or to u8 through the
    FakeQuantize) is not counted, as ONNX Runtime's harness feeds u8 directly."""
    import openvino as ov

    config = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY", "PERF_COUNT": "YES"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = str(threads)
    request = ov.Core().compile_model(model, "CPU", config).create_infer_request()
    request.infer([x])  # warm-up
    best, kernel = float("inf"), "unknown"
    for _ in range(repeats):
        request.infer([x])
        for p in request.get_profiling_info():
            if p.node_type.startswith(("FullyConnected", "MatMul")):
                best, kernel = min(best, p.real_time.total_seconds()), p.exec_type
    return best, kernel


def bf16_gemm_peak(n: int = 4096, repeats: int = 5, threads: int = 0) -> dict[str, Any] | None:
    """bf16 GEMM GFLOP/s (OpenVINO and torch), or None where OpenVINO reports no native bf16."""
    try:
        import openvino as ov
        from openvino import opset13 as ops
    except ImportError:
        return None
    if "BF16" not in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        return None
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, n), dtype=np.float32)
    param = ops.parameter([n, n], np.float32)
    model = ov.Model([ops.matmul(param, ops.constant(rng.standard_normal((n, n), dtype=np.float32)), False, True)], [param])
    seconds, kernel = _openvino_gemm(model, x, "bf16", threads, repeats)
    out: dict[str, Any] = {"n": n, "openvino_gflops_best": 2 * n**3 / seconds / 1e9, "openvino_kernel": kernel}
    try:
        import torch

        if threads:
            torch.set_num_threads(threads)
        a, b = (torch.from_numpy(rng.standard_normal((n, n), dtype=np.float32)).bfloat16() for _ in range(2))
        torch.matmul(a, b)  # warm-up
        out["torch_gflops_best"] = 2 * n**3 / min(timed(lambda: torch.matmul(a, b)) for _ in range(repeats)) / 1e9
    except ImportError:
        pass
    out["gflops_best"] = max(out["openvino_gflops_best"], out.get("torch_gflops_best", 0.0))
    out["how"] = "OpenVINO MatMul compiled bf16 (and torch bf16 matmul); the better of the two"
    return out


def openvino_int8_gemm_peak(n: int = 4096, repeats: int = 5, threads: int = 0) -> dict[str, Any] | None:
    """int8 GEMM GOP/s of OpenVINO's quantized MatMul (u8 x s8), or None without OpenVINO."""
    try:
        import openvino as ov
        from openvino import opset13 as ops
    except ImportError:
        return None
    rng = np.random.default_rng(0)
    x = rng.uniform(0.0, 2.55, (n, n)).astype(np.float32)
    param = ops.parameter([n, n], np.float32)
    low, high = ops.constant(np.float32(0.0)), ops.constant(np.float32(2.55))
    act = ops.fake_quantize(param, low, high, low, high, 256)  # u8 activations
    weights = ops.constant(rng.integers(-127, 128, (n, n), dtype=np.int8))
    scale = ops.constant(np.full((n, 1), 0.01, dtype=np.float32))  # per output channel, as NNCF writes weights
    dequantized = ops.multiply(ops.convert(weights, np.float32), scale)
    model = ov.Model([ops.matmul(act, dequantized, False, True)], [param])
    seconds, kernel = _openvino_gemm(model, x, "bf16" if "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES") else "f32",
                                     threads, repeats)
    return {"n": n, "gops_best": 2 * n**3 / seconds / 1e9, "kernel": kernel,
            "how": "OpenVINO FakeQuantize(u8) x int8 weights MatMul"}
