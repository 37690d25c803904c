"""int8 ONNX for the CPU: ONNX Runtime's quantizer recipes, each measured, the fastest that passes the gate kept.

Recipes (``Recipe``), all on the fp32 graph that passed the fp32 gate (so fused ops such as ``Attention`` are there):

- ``dynamic``: ``quantize_dynamic``: int8 weights (per output channel or per tensor), activations quantized per call
  from their observed range (``DynamicQuantizeMatMul``); no calibration data needed;
- ``dynamic+attention``: the same plus the fused ``Attention`` ops (their QKV projection becomes ``QAttention``);
- ``static``: ``quantize_static`` in QDQ format, activation ranges calibrated (min/max) on the export calibration
  set (``export.parity.calibration_inputs``, one row at a time, unpadded), uint8 activations, per-channel int8 weights; ORT's QDQ quantizer also
  quantizes the activation x activation MatMuls (QK^T, attention x V) where attention is not fused (T5 exported
  with ``--no-fuse-attention``); T5's fused ``MultiHeadAttention`` stays fp32 (it has no int8 kernel). (Symmetric int8 activations measured worse: min cos 0.845 vs 0.978 on the tiny
  fixture; percentile and entropy calibration cannot stack the calibration set's batches of different lengths.)

The head (pooling sums, Dense, L2 norm) always stays fp32. When no recipe passes with every encoder MatMul in int8,
``sensitivity_order`` ranks the MatMuls by the damage each does alone, and ``export.build`` keeps the most harmful
ones fp32, fewest first, until the gate passes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import onnx

from export.onnx_graph import encoder_matmuls

Feeds = dict[str, np.ndarray]


@dataclass(frozen=True)
class Recipe:
    """One way to quantize: the method, the weight granularity, whether attention goes int8, what stays fp32."""

    method: str  # "dynamic" or "static"
    per_channel: bool
    attention: bool = False  # dynamic: the fused Attention ops too (QAttention)
    keep_fp32: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        parts = [self.method, "per_channel" if self.per_channel else "per_tensor"]
        if self.attention:
            parts.append("attention")
        if self.keep_fp32:
            parts.append(f"{len(self.keep_fp32)}_fp32")
        return "+".join(parts)


def prepare(src: Path, dst: Path) -> Path:
    """ORT's quantization pre-processing (symbolic shape inference), so the quantizer knows the types that fused
    contrib ops (``Attention``, ``SkipLayerNormalization``) produce; no graph optimization here."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    quant_pre_process(str(src), str(dst), skip_optimization=True, auto_merge=True)
    return dst


def has_fused_attention(path: Path) -> bool:
    return any(n.op_type == "Attention" for n in onnx.load(str(path), load_external_data=False).graph.node)


def recipes(path: Path, per_channel: bool | None) -> list[Recipe]:
    """Every recipe to measure with all encoder MatMuls in int8 (``per_channel`` None: both granularities)."""
    granularities = (True, False) if per_channel is None else (per_channel,)
    out = [Recipe("dynamic", pc) for pc in granularities]
    if has_fused_attention(path):
        out += [Recipe("dynamic", pc, attention=True) for pc in granularities]
    out.append(Recipe("static", True))
    return out


def weight_matmuls(path: Path) -> list[str]:
    """The encoder MatMuls with a weight initializer, in graph order."""
    return _matmuls(onnx.load(str(path), load_external_data=False).graph)[0]


def _matmuls(graph: onnx.GraphProto) -> tuple[list[str], list[str]]:
    """(encoder MatMuls with a weight initializer, MatMuls outside the encoder: the Dense head, always fp32)."""
    encoder = encoder_matmuls(graph)
    head = [n.name for n in graph.node if n.op_type == "MatMul" and n.name not in encoder]
    return [k for k, v in encoder.items() if v], head


def single_rows(batches: Iterable[Feeds]) -> Iterator[Feeds]:
    """Each row of each batch alone, cut to its own length: calibration sees no padding, and the calibration
    model, which keeps every intermediate tensor of a run alive until its min/max are taken, holds one row's."""
    for feeds in batches:
        for i in range(len(feeds["input_ids"])):
            length = int(feeds["attention_mask"][i].sum())
            yield {k: v[i : i + 1, :length] if v.ndim == 2 else v[i : i + 1] for k, v in feeds.items()}


class _Reader:
    """``onnxruntime.quantization.CalibrationDataReader`` over the calibration rows, with the ``set_range`` that
    ORT's strided min/max calibration (``CalibStridedMinMax``) uses to take them one at a time."""

    def __init__(self, feeds: Callable[[], Iterable[Feeds]]) -> None:
        self._feeds = list(single_rows(feeds()))  # token ids only: small
        self._it: Iterator[Feeds] = iter(self._feeds)

    def __len__(self) -> int:
        return len(self._feeds)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._it = iter(self._feeds[start_index:end_index])

    def get_next(self) -> Feeds | None:
        return next(self._it, None)


def quantize(src: Path, dst: Path, recipe: Recipe, calibration: Callable[[], Iterable[Feeds]] | None = None) -> dict[str, Any]:
    """Write ``src`` quantized by ``recipe`` to ``dst``; return the manifest's description of it.

    ``src`` should have been through ``prepare``; ``calibration`` yields the feeds of the calibration set (static).
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

    weights, head = _matmuls(onnx.load(str(src), load_external_data=False).graph)
    exclude = head + list(recipe.keep_fp32)
    if recipe.method == "dynamic":
        quantize_dynamic(
            str(src),
            str(dst),
            op_types_to_quantize=["MatMul", "Attention"] if recipe.attention else ["MatMul"],
            per_channel=recipe.per_channel,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=exclude,
            extra_options={"MatMulConstBOnly": True},  # activation x activation MatMuls need a static range
        )
    elif recipe.method == "static":
        if calibration is None:
            raise ValueError("static quantization needs calibration feeds")
        quantize_static(
            str(src),
            str(dst),
            _Reader(calibration),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=["MatMul"],
            per_channel=recipe.per_channel,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=exclude,
            calibrate_method=CalibrationMethod.MinMax,
            # one row at a time, ranges merged (the same min/max as all at once): a batch of 16 rows padded to 512
            # tokens took over 22 GB on the T5-base shape and was killed for memory. (CalibMaxIntermediateOutputs
            # would be the other way to merge, but ORT 1.32 discards the batches it counts instead of merging them.)
            extra_options={"CalibStridedMinMax": 1},
        )
    else:
        raise ValueError(f"unknown int8 method {recipe.method!r}")
    ops = [n.op_type for n in onnx.load(str(dst), load_external_data=False).graph.node]
    return {
        "applied": f"onnxruntime.quantization.quantize_{recipe.method}",
        "recipe": recipe.label,
        "weight_type": "int8",
        "per_channel": recipe.per_channel,
        "int8_attention": recipe.attention,
        "quantized_matmuls": len([k for k in weights if k not in recipe.keep_fp32]),
        "fp32_matmuls": exclude,
        "quantized_ops": {op: ops.count(op) for op in sorted(set(ops)) if op in QUANTIZED_OPS},
    }


QUANTIZED_OPS = {"DynamicQuantizeMatMul", "MatMulInteger", "QAttention", "QuantizeLinear", "DequantizeLinear", "QLinearMatMul", "DynamicQuantizeLinear"}


def sensitivity_order(damage: dict[str, float]) -> list[str]:
    """MatMul names from the most to the least harmful alone (damage: 1 - min cosine with only it in int8)."""
    return sorted(damage, key=lambda k: (-damage[k], k))
