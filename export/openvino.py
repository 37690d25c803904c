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
  activation ranges calibrated on the export calibration set one unpadded row at a time. ``ignored`` names the
  MatMuls left in the float precision besides the attention ops (NNCF's ignored scope). Static ranges fit
  the rows they were calibrated on: ``export.auto`` gates the result on held-out rows too.
- ``INT8_LADDER``: the recipes tried in turn until one passes the int8 gate. Attention stays in the float
  precision on every rung: quantizing OpenVINO's attention op was both slower and less accurate. Measured on a
  2-core Xeon with AMX (T5-base shape, random weights, 100 corpus texts, bf16 around int8): int8 attention 145.8
  docs/s at min cos 0.99307, float attention 150.6-165.8 docs/s at 0.99327, the bf16 engine 116.5-125.3 docs/s; on
  all-MiniLM-L6-v2 578 and 616 docs/s against bf16's 564-569, at min cos 0.859 and 0.924 (its FF activations do
  not survive static int8 ranges, so MiniLM keeps bf16). SmoothQuant (the preset's, alpha 0.95 on MatMuls) moves
  activation range into the weights, which pays where a trained model has outlier channels; on the random-weight
  T5-base it cost accuracy at the same speed (the export's gate: min cos 0.98680 with it, 0.99100 without; 150.6-165.8
  and 163.3-164.6 docs/s), so the ladder tries both.

OpenVINO and NNCF are imported only here, and only when an ``auto`` export builds OpenVINO engines.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from runtime.bundle import INPUT_NAMES, OUTPUT_NAME

Feeds = dict[str, np.ndarray]

ATTENTION_OPS = ("ScaledDotProductAttention",)
# float on every rung: the Dense projection of the pooled vector. Its input is one vector per row, so int8 rounding
# reaches the output unaveraged, and a row pooled to zero (only instruction tokens) must stay zero, which a static
# range that does not hold 0 on its grid breaks (the tiny fixture: that row came out a unit vector, min cos 0)
FLOAT_ROLES = ("pooled",)


@dataclass(frozen=True)
class Int8Rung:
    """One NNCF int8 recipe of the ladder: the ``matmul_roles`` left float besides ``FLOAT_ROLES``, and whether
    SmoothQuant runs."""

    label: str
    float_roles: tuple[str, ...] = ()
    smooth_quant: bool = True

    def float_matmuls(self, roles: dict[str, list[str]]) -> list[str]:
        """The names of the MatMuls this recipe leaves float, from ``matmul_roles``."""
        return [name for role in (*FLOAT_ROLES, *self.float_roles) for name in roles[role]]


# tried in this order, the first that passes is kept; the attention op (``ATTENTION_OPS``) and ``FLOAT_ROLES`` stay
# float on every rung
INT8_LADDER: tuple[Int8Rung, ...] = (
    Int8Rung("linear layers int8, attention float"),
    Int8Rung("linear layers int8, attention float, no SmoothQuant", smooth_quant=False),
    Int8Rung("linear layers int8 but the FF outputs, attention float", ("ff_output",)),
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


def matmul_roles(xml_path: Path, ff_width: int) -> dict[str, list[str]]:
    """The MatMuls of an IR that have a weight, by role: ``ff_input`` (hidden -> ff) and ``ff_output`` (ff -> hidden)
    found by weight shape, whichever way round the weight is stored (``transpose_b``), and ``pooled``: those fed one
    vector per row (the Dense projection after the pooling)."""
    import openvino as ov

    roles: dict[str, list[str]] = {"ff_input": [], "ff_output": [], "pooled": []}
    for op in ov.Core().read_model(str(xml_path)).get_ops():
        if op.get_type_name() != "MatMul":
            continue
        weight = op.input_value(1).get_node()
        if weight.get_type_name() != "Constant" or len(weight.get_output_shape(0)) != 2:
            continue
        if op.input_value(0).get_partial_shape().rank.get_length() == 2:
            roles["pooled"].append(op.get_friendly_name())
            continue
        rows, cols = weight.get_output_shape(0)
        out_width = rows if op.get_attributes().get("transpose_b") else cols
        in_width = cols if op.get_attributes().get("transpose_b") else rows
        if out_width == ff_width and in_width != ff_width:
            roles["ff_input"].append(op.get_friendly_name())
        elif in_width == ff_width and out_width != ff_width:
            roles["ff_output"].append(op.get_friendly_name())
    return roles


def quantize_int8(xml_path: Path, dst: Path, rows: Iterable[Feeds], ignored: list[str],
                  smooth_quant: bool = True) -> dict[str, Any]:
    """NNCF int8 of the IR at ``xml_path`` calibrated on ``rows`` (one unpadded row each), written to ``dst``."""
    import nncf
    import openvino as ov
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, AdvancedSmoothQuantParameters

    nncf.set_log_level(logging.ERROR)
    data = list(rows)
    model = ov.Core().read_model(str(xml_path))
    quantized = nncf.quantize(
        model,
        nncf.Dataset(data),
        model_type=nncf.ModelType.TRANSFORMER,
        subset_size=len(data),
        ignored_scope=nncf.IgnoredScope(names=list(ignored), types=list(ATTENTION_OPS), validate=False),
        advanced_parameters=None if smooth_quant else AdvancedQuantizationParameters(
            smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=-1)),  # NNCF's "off" for its MatMul alpha
    )
    ov.save_model(quantized, str(dst), compress_to_fp16=False)
    fq = sum(1 for op in quantized.get_ops() if op.get_type_name() == "FakeQuantize")
    return {
        "applied": "nncf.quantize(model_type=TRANSFORMER)",
        "nncf": nncf.__version__,
        "calibration_rows": len(data),
        "float_matmuls": sorted(ignored),
        "float_op_types": sorted(ATTENTION_OPS),
        "smooth_quant": smooth_quant,
        "fake_quantize_ops": fq,
    }
