"""OpenVINO engines for the CPU: the fp32 model as OpenVINO IR, and its NNCF int8 version.

- ``to_ir``: ``openvino.convert_model`` of ``InstructorModel`` itself (the same forward as the ONNX graph:
  instruction-masked mean pooling, Dense and L2 norm inside), traced from PyTorch with the model's own attention
  (SDPA becomes OpenVINO's ScaledDotProductAttention op), batch and sequence dynamic, saved with fp32 weights
  (``compress_to_fp16=False``: the same IR serves f32 inference, gated at fp32's max abs, and bf16 inference).
  Measured on all-MiniLM-L6-v2 in bf16 (2-core Xeon with AMX, same batches): 1.22x the docs/s of the IR that
  OpenVINO's ONNX frontend makes of the traced ONNX graph (eager attention, which ORT's optimizer needs).
  ``to_ir_from_onnx`` is that ONNX route, the fallback when the PyTorch conversion fails.
- ``quantize_int8``: NNCF post-training quantization with ``model_type=TRANSFORMER`` (its transformer preset:
  mixed preset, SmoothQuant on MatMul inputs, symmetric quantizers for activation x activation MatMuls), static
  activation ranges calibrated on the export calibration set one unpadded row at a time. ``ignored`` names
  MatMuls left in the float precision (NNCF's ignored scope). Static ranges fit the rows they were calibrated on:
  ``export.auto`` gates the result on held-out rows too.
- ``INT8_LADDER``: the ignored scopes tried in turn until one passes the int8 gate.

OpenVINO and NNCF are imported only here, and only when an ``auto`` export builds OpenVINO engines.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from runtime.bundle import INPUT_NAMES, OUTPUT_NAME

Feeds = dict[str, np.ndarray]

# (label, which MatMuls NNCF leaves in the float precision): tried in this order, the first that passes is kept
INT8_LADDER: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("all MatMuls int8", ()),
    ("FF output MatMuls kept float", ("ff_output",)),
)


def _name_io(model: Any) -> Any:
    """The engine's tensor names on the converted model's inputs and output."""
    for port, name in zip(model.inputs, INPUT_NAMES):
        port.get_tensor().set_names({name})
    model.outputs[0].get_tensor().set_names({OUTPUT_NAME})
    return model


def to_ir(model: Any, xml_path: Path) -> dict[str, Any]:
    """Write the OpenVINO IR of ``InstructorModel`` ``model`` (``xml_path`` and its ``.bin``), from PyTorch."""
    import openvino as ov
    import torch

    from export.onnx_graph import example_features

    model = model.eval().to("cpu", torch.float32)
    with torch.no_grad():
        converted = ov.convert_model(model, example_input=example_features(model))
    ov.save_model(_name_io(converted), str(xml_path), compress_to_fp16=False)
    return {"applied": "openvino.convert_model (PyTorch)", "openvino": ov.__version__, "weights": "float32"}


def to_ir_from_onnx(onnx_path: Path, xml_path: Path) -> dict[str, Any]:
    """Write the OpenVINO IR of the plain fp32 ONNX graph (OpenVINO's ONNX frontend)."""
    import openvino as ov

    ov.save_model(ov.convert_model(str(onnx_path)), str(xml_path), compress_to_fp16=False)
    return {"applied": "openvino.convert_model (ONNX frontend)", "openvino": ov.__version__, "weights": "float32"}


def ff_matmuls(xml_path: Path, ff_width: int) -> dict[str, list[str]]:
    """The encoder's FF MatMuls of an IR by role, found by weight shape: ``ff_input`` (hidden -> ff) and
    ``ff_output`` (ff -> hidden), whichever way round the weight is stored (``transpose_b``)."""
    import openvino as ov

    roles: dict[str, list[str]] = {"ff_input": [], "ff_output": []}
    for op in ov.Core().read_model(str(xml_path)).get_ops():
        if op.get_type_name() != "MatMul":
            continue
        weight = op.input_value(1).get_node()
        if weight.get_type_name() != "Constant" or len(weight.get_output_shape(0)) != 2:
            continue
        rows, cols = weight.get_output_shape(0)
        out_width = rows if op.get_attributes().get("transpose_b") else cols
        in_width = cols if op.get_attributes().get("transpose_b") else rows
        if out_width == ff_width and in_width != ff_width:
            roles["ff_input"].append(op.get_friendly_name())
        elif in_width == ff_width and out_width != ff_width:
            roles["ff_output"].append(op.get_friendly_name())
    return roles


def quantize_int8(xml_path: Path, dst: Path, rows: Iterable[Feeds], ignored: list[str]) -> dict[str, Any]:
    """NNCF int8 of the IR at ``xml_path`` calibrated on ``rows`` (one unpadded row each), written to ``dst``."""
    import nncf
    import openvino as ov

    nncf.set_log_level(logging.ERROR)
    data = list(rows)
    model = ov.Core().read_model(str(xml_path))
    quantized = nncf.quantize(
        model,
        nncf.Dataset(data),
        model_type=nncf.ModelType.TRANSFORMER,
        subset_size=len(data),
        ignored_scope=nncf.IgnoredScope(names=list(ignored)) if ignored else None,
    )
    ov.save_model(quantized, str(dst), compress_to_fp16=False)
    fq = sum(1 for op in quantized.get_ops() if op.get_type_name() == "FakeQuantize")
    return {
        "applied": "nncf.quantize(model_type=TRANSFORMER)",
        "nncf": nncf.__version__,
        "calibration_rows": len(data),
        "float_matmuls": sorted(ignored),
        "fake_quantize_ops": fq,
    }
