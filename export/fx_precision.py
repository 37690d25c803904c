"""fp16/bf16 for ``.pt2`` engines: ``export.precision_rule`` applied to the graph of a ``torch.export`` program.

The same pass as ``export.mixed_precision`` (ONNX), over ATen nodes instead of ONNX nodes: one walk in topological
order decides each node's precision with the shared rule, casts are inserted at the island borders, and weights used
only by low-precision nodes are replaced by low-precision copies (the source model is left as it was). The caller
exports the rewritten module again, so that shapes and dtypes are traced afresh.

One difference from the ONNX graph: ``torch.export`` keeps HF's attention as one ``scaled_dot_product_attention``
node, a fused product. It computes in the low precision and takes its additive position bias + mask in the query's
dtype (the kernel requires it); the softmax stays fp32 inside the kernel.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch import fx

from export.precision_rule import ATEN_KINDS, FP32_ISLANDS, LAYOUT, OTHER, PROJECTION, SCALING, runs_low

LOW_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
ENCODER_MODULE = "auto_model"  # InstructorModel's encoder attribute: its nodes are the encoder's, the head's are not


def _op_name(node: fx.Node) -> str:
    return getattr(node.target, "__name__", str(node.target)).split(".")[0]


def _scope(node: fx.Node) -> str:
    """The innermost module path the node was traced in (``auto_model.encoder.block.0.layer.1.DenseReluDense.wo``)."""
    stack = node.meta.get("nn_module_stack") or {}
    return str(list(stack.values())[-1][0]) if stack else ""


def _in_encoder(node: fx.Node) -> bool:
    scope = _scope(node)
    return scope == ENCODER_MODULE or scope.startswith(ENCODER_MODULE + ".")


def _is_float_tensor(arg: Any) -> bool:
    val = arg.meta.get("val") if isinstance(arg, fx.Node) else None
    return isinstance(val, torch.Tensor) and val.is_floating_point()


def _is_constant(arg: Any) -> bool:
    return not isinstance(arg, fx.Node) or arg.op == "get_attr"


def low_precision_nodes(graph: fx.Graph, ff_width: int) -> set[fx.Node]:
    """The nodes to compute in the low precision, by ``export.precision_rule``."""
    low: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        kind = ATEN_KINDS.get(_op_name(node), OTHER)
        args = node.args
        fed = bool(args) and isinstance(args[0], fx.Node) and args[0] in low
        constant, in_features = False, None
        if kind == PROJECTION:
            in_features = int(args[1].meta["val"].shape[1])  # Linear weights are [out, in]
        elif kind == SCALING:
            if len(args) != 2:
                kind = OTHER
            else:
                a, b = args
                b_low = isinstance(b, fx.Node) and b in low
                fed, constant = (True, _is_constant(b)) if fed else (b_low, _is_constant(a))
        rule = dict(in_encoder=_in_encoder(node), fed_by_low=fed, other_operand_constant=constant)
        if runs_low(kind, weight_in_features=in_features, ff_width=ff_width, **rule):
            low.add(node)
    return low


def convert(module: fx.GraphModule, precision: str, ff_width: int) -> dict[str, Any]:
    """Rewrite ``module`` (from ``ExportedProgram.module()``) in place to ``precision``; its manifest description."""
    low_dtype = LOW_DTYPES[precision]
    graph = module.graph
    low = low_precision_nodes(graph, ff_width)
    low_values: set[fx.Node] = set()
    casts: dict[tuple[fx.Node, torch.dtype], fx.Node] = {}

    def cast(value: fx.Node, dtype: torch.dtype) -> fx.Node:
        if (value, dtype) not in casts:
            with graph.inserting_after(value):
                casts[(value, dtype)] = graph.call_function(torch.ops.aten._to_copy.default, (value,), {"dtype": dtype})
        return casts[(value, dtype)]

    def to_low(value: Any) -> Any:
        if not _is_float_tensor(value) or value in low_values:
            return value
        if value.op == "get_attr" and all(user in low for user in value.users):
            owner_path, _, name = value.target.rpartition(".")
            owner = module.get_submodule(owner_path)
            old = getattr(owner, name)
            new = old.detach().to(low_dtype)
            setattr(owner, name, torch.nn.Parameter(new, requires_grad=False) if isinstance(old, torch.nn.Parameter) else new)
            low_values.add(value)
            return value
        return cast(value, low_dtype)

    def to_fp32(value: Any) -> Any:
        return cast(value, torch.float32) if isinstance(value, fx.Node) and value in low_values else value

    for node in list(graph.nodes):
        if node.target is torch.ops.aten._assert_tensor_metadata.default:
            graph.erase_node(node)  # dtype assertions of the fp32 trace; the re-export traces the new dtypes
        elif node in low:
            if ATEN_KINDS.get(_op_name(node)) == LAYOUT:
                node.args = (to_low(node.args[0]), *node.args[1:])
            else:
                node.args = fx.node.map_arg(node.args, to_low)
                node.kwargs = fx.node.map_arg(node.kwargs, to_low)
            low_values.add(node)
        elif node.op in ("call_function", "output"):
            node.args = fx.node.map_arg(node.args, to_fp32)
            node.kwargs = fx.node.map_arg(node.kwargs, to_fp32)
    graph.lint()
    module.recompile()
    kept = [_scope(n) for n in graph.nodes if n not in low and n.op == "call_function" and _in_encoder(n)
            and ATEN_KINDS.get(_op_name(n)) == PROJECTION]
    return {
        "applied": "export.fx_precision",
        "low_precision": {"fp16": "float16", "bf16": "bfloat16"}[precision],
        "low_precision_ops": dict(sorted(Counter(_op_name(n) for n in low).items())),
        "fp32_matmuls": kept,
        "fp32_islands": FP32_ISLANDS,
        "casts": len(casts),
    }
