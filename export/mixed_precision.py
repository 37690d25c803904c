"""fp16/bf16 ONNX with fp32 islands, as a small pass over the fp32 graph (precision lives in the graph).

Which nodes compute in the low precision is ``export.precision_rule`` (shared with the ``.pt2`` path): the encoder's
MatMuls except the FF output (``wo``), plus the layout ops and constant scalings fed by them. Casts are inserted at
the island borders; weights used only by low-precision nodes are stored in the low precision.

This is what TensorRT's strongly typed networks build as written, and what ONNX Runtime's CUDA EP runs. ORT's
own ``float16.convert_float_to_float16`` has no bf16 and a name/op block list that cannot say "the FF output
MatMul", hence this pass.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from export.onnx_graph import ENCODER_SCOPE
from export.precision_rule import FP32_ISLANDS, LAYOUT, ONNX_KINDS, OTHER, PRODUCT, PROJECTION, SCALING, runs_low

LOW_TYPES = {"fp16": (TensorProto.FLOAT16, np.float16), "bf16": (TensorProto.BFLOAT16, ml_dtypes.bfloat16)}


def low_precision_nodes(graph: onnx.GraphProto, ff_width: int) -> set[str]:
    """Names of the nodes to compute in the low precision (``export.precision_rule``); ``wo`` has ``ff_width`` rows."""
    inits = {i.name: i for i in graph.initializer}
    constants = set(inits) | {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    producer = {out: n.name for n in graph.node for out in n.output}
    low: set[str] = set()
    for node in graph.node:  # torch.onnx writes nodes in topological order: one pass sees producers first
        from_low = [producer.get(i) in low for i in node.input]
        kind = ONNX_KINDS.get(node.op_type, OTHER)
        fed, constant, in_features = bool(from_low and from_low[0]), False, None
        if kind == PROJECTION:
            weight = inits.get(node.input[1])
            if weight is not None and len(weight.dims) == 2:
                in_features = int(weight.dims[0])  # ONNX MatMul weights are [in, out]
            else:
                kind = PRODUCT
        elif kind == SCALING:
            if len(node.input) != 2:
                kind = OTHER
            else:
                a, b = node.input
                fed, constant = (from_low[0], b in constants) if from_low[0] else (from_low[1], a in constants)
        rule = dict(in_encoder=node.name.startswith(ENCODER_SCOPE), fed_by_low=fed, other_operand_constant=constant)
        if runs_low(kind, weight_in_features=in_features, ff_width=ff_width, **rule):
            low.add(node.name)
    return low


def _float_inputs(node: onnx.NodeProto) -> list[int]:
    return [0] if ONNX_KINDS.get(node.op_type) == LAYOUT else list(range(len(node.input)))


def convert(src: Path, dst: Path, precision: str, ff_width: int) -> dict[str, Any]:
    """Write the ``precision`` (fp16|bf16) graph of the fp32 graph ``src`` to ``dst``; return its manifest description."""
    low_type, low_np = LOW_TYPES[precision]
    model = onnx.load(str(src))
    graph = model.graph
    low = low_precision_nodes(graph, ff_width)
    inits = {i.name: i for i in graph.initializer}
    consumers: dict[str, list[str]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node.name)
    low_tensors: set[str] = set()
    casts: dict[tuple[str, int], str] = {}
    nodes: list[onnx.NodeProto] = []

    def cast(name: str, to: int) -> str:
        if (name, to) not in casts:
            out = f"{name}/to_{TensorProto.DataType.Name(to).lower()}"
            nodes.append(helper.make_node("Cast", [name], [out], to=to, name=f"{out}/Cast"))
            casts[(name, to)] = out
        return casts[(name, to)]

    for node in graph.node:
        if node.name in low:
            for idx in _float_inputs(node):
                name = node.input[idx]
                if name in low_tensors:
                    continue
                if name in inits and all(c in low for c in consumers[name]):
                    array = numpy_helper.to_array(inits[name]).astype(low_np)
                    inits[name].CopyFrom(numpy_helper.from_array(array, name))
                    low_tensors.add(name)
                else:
                    node.input[idx] = cast(name, low_type)
            low_tensors.update(node.output)
        else:
            for idx, name in enumerate(node.input):
                if name in low_tensors:
                    node.input[idx] = cast(name, TensorProto.FLOAT)
        nodes.append(node)
    if any(o.name in low_tensors for o in graph.output):
        raise AssertionError("the graph output must stay fp32")
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.value_info[:]  # intermediate types changed; ORT and TensorRT infer them
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))
    kept = [n.name for n in nodes if n.op_type == "MatMul" and n.name.startswith(ENCODER_SCOPE) and n.name not in low]
    return {
        "applied": "export.mixed_precision",
        "low_precision": {"fp16": "float16", "bf16": "bfloat16"}[precision],
        "low_precision_ops": dict(sorted(Counter(n.op_type for n in nodes if n.name in low).items())),
        "fp32_matmuls": kept,
        "fp32_islands": FP32_ISLANDS,
        "casts": len(casts),
    }
