"""int8 ONNX for the CPU: ONNX Runtime dynamic quantization of the encoder's MatMul weights.

Weights become int8 (per output channel or per tensor); activations are quantized per call from their observed
range (``DynamicQuantizeLinear``), so no calibration data is needed. The head (pooling sums, Dense, L2 norm)
always stays fp32. Per-tensor activation ranges are hurt by the outliers of FF activations, so
``exclusion_steps`` lists what to keep fp32 when quantizing everything misses the gate: first the FF output
MatMuls, then the FF input ones too. ``export.build`` keeps the first step that passes and records it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx

from export.onnx_graph import encoder_matmuls


def exclusion_steps(path: Path, ff: int) -> list[tuple[str, list[str]]]:
    """(label, encoder MatMuls kept fp32) from most to least quantized."""
    weights = {k: v for k, v in encoder_matmuls(onnx.load(str(path), load_external_data=False).graph).items() if v}
    ff_out = sorted(k for k, v in weights.items() if len(v) == 2 and v[0] == ff)
    ff_in = sorted(k for k, v in weights.items() if len(v) == 2 and v[1] == ff)
    return [("all_matmuls", []), ("ff_output_fp32", ff_out), ("attention_only", ff_out + ff_in)]


def quantize_int8(src: Path, dst: Path, per_channel: bool, keep_fp32: list[str]) -> dict[str, Any]:
    """Write the dynamically quantized graph of ``src`` to ``dst``; return the manifest's description of it."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    graph = onnx.load(str(src), load_external_data=False).graph
    weights = encoder_matmuls(graph)
    head = [n.name for n in graph.node if n.op_type == "MatMul" and n.name not in weights]
    quantize_dynamic(
        str(src),
        str(dst),
        op_types_to_quantize=["MatMul"],
        per_channel=per_channel,
        weight_type=QuantType.QInt8,
        nodes_to_exclude=head + keep_fp32,
        extra_options={"MatMulConstBOnly": True},  # weights only; attention's activation x activation stays fp32
    )
    quantized = [k for k, v in weights.items() if v and k not in keep_fp32]
    return {
        "applied": "onnxruntime.quantization.quantize_dynamic",
        "weight_type": "int8",
        "per_channel": per_channel,
        "quantized_matmuls": len(quantized),
        "fp32_matmuls": head + keep_fp32,
    }
