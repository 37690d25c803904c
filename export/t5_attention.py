"""T5 encoder attention -> ONNX Runtime's ``MultiHeadAttention`` with the position bias as ``attention_bias``.

ONNX Runtime's transformer optimizer (model type ``t5``) fuses T5's RMSNorm into ``SimplifiedLayerNormalization``
and ``SkipSimplifiedLayerNormalization``, but its attention fusion (``FusionT5Attention`` in
``onnxruntime/transformers/onnx_model_t5.py``) does not apply to this graph: it looks for the mask pattern of older
transformers (``Add(Mul(Sub(1, mask)))``) and for a ``RelativePositionBias`` node made by
``FusionRelativePositionBiasBlock``, an op that only ORT's CUDA EP implements. The traced graph of transformers 5's
T5 (SDPA decomposed by the tracer) computes the position bias once, in the first layer, as
``Where(mask, bias, finfo.min)`` of shape ``[batch, heads, q, k]``, and every layer adds that one tensor to its
scores. This pass keeps that subgraph as it is, and replaces each layer's attention core

    q, k, v = MatMul(x, Wq), MatMul(x, Wk), MatMul(x, Wv)              (kept: the int8 recipes quantize them)
    scores  = MatMul(Mul(Transpose(Reshape(q)), c), Mul(Transpose(Reshape(k)), c)) + position_bias
    out     = Reshape(Transpose(MatMul(Softmax(scores), Transpose(Reshape(v)))))

by ``com.microsoft.MultiHeadAttention(q, k, v, attention_bias=position_bias)`` with ``scale = c * c`` (1.0 for
T5) and ``num_heads`` from the Reshape. ORT's CPU kernel (``AttentionCPUBase::ApplyAttention``) copies the bias
into the score buffer, accumulates ``scale * Q K^T`` onto it with one GEMM per (row, head), and runs the softmax in
place: the same arithmetic as the unfused ops (fp32, the softmax over the same values), without the transposes,
the two scalings by 1.0, the separate Add and the intermediate tensors. ``Attention`` (packed QKV weights) would
fold the projections in too, but its int8 form (``QAttention``) has no ``attention_bias`` input, so the
projections stay MatMuls that the quantizer can take.

Shape nodes that read the removed tensors (the first layer takes the sequence length for the position bias from
its transposed K) are rewired to the attention input ``x`` with the matching axis. Whatever does not match is left
as it was; ``fuse`` raises ``FusionError`` when no layer matched, and the exporter then keeps the unfused graph
and says why (``export.optimize``).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

MS_DOMAIN = "com.microsoft"


class FusionError(RuntimeError):
    """The T5 attention pattern was not found (or not safely replaceable); the message says where it stopped."""


@dataclass
class _Layer:
    """One matched attention core: what the MultiHeadAttention node needs and what it replaces."""

    x: str  # the attention input [batch, seq, hidden] (output of the RMSNorm)
    q: str
    k: str
    v: str
    bias: str
    out: str
    num_heads: int
    scale: float
    removed: list[onnx.NodeProto]
    dims: dict[str, list[Any]]  # removed tensor -> its axes in terms of x ("x0", "x1") or constants
    name: str


class _Graph:
    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.graph = model.graph
        self.inits = {i.name: i for i in self.graph.initializer}
        self.refresh()

    def refresh(self) -> None:
        self.producer = {o: n for n in self.graph.node for o in n.output if o}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in self.graph.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)

    def const(self, name: str) -> np.ndarray | None:
        """The value of an initializer or a ``Constant`` node's output, else None."""
        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    return numpy_helper.to_array(a.t)
        return None

    def parent(self, node: onnx.NodeProto, index: int, op_type: str) -> onnx.NodeProto | None:
        if index >= len(node.input):
            return None
        p = self.producer.get(node.input[index])
        return p if p is not None and p.op_type == op_type else None

    def only_consumer(self, tensor: str) -> onnx.NodeProto | None:
        users = self.consumers.get(tensor, [])
        return users[0] if len(users) == 1 else None


def _attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _scalar(g: _Graph, node: onnx.NodeProto) -> tuple[str, float] | None:
    """(the non-constant input, the scalar) of ``Mul(t, c)`` / ``Mul(c, t)``."""
    for i in (0, 1):
        c = g.const(node.input[1 - i])
        if c is not None and c.size == 1:
            return node.input[i], float(c.reshape(()))
    return None


def _head_path(g: _Graph, tensor: str, perms: tuple[tuple[int, ...], ...]) -> tuple[onnx.NodeProto, list[onnx.NodeProto], float] | None:
    """Follow ``[Mul by a scalar] <- Transpose(perm) [<- Transpose(perm)] <- Reshape <- MatMul(x, W)`` upward from
    ``tensor``: (the projection MatMul, the nodes in between, the scalar); None if it does not match."""
    nodes: list[onnx.NodeProto] = []
    scale = 1.0
    node = g.producer.get(tensor)
    if node is not None and node.op_type == "Mul":
        found = _scalar(g, node)
        if found is None:
            return None
        tensor, scale = found
        nodes.append(node)
        node = g.producer.get(tensor)
    for perm in perms:
        if node is None or node.op_type != "Transpose" or tuple(_attr(node, "perm", ())) != perm:
            return None
        nodes.append(node)
        node = g.producer.get(node.input[0])
    if node is None or node.op_type != "Reshape":
        return None
    nodes.append(node)
    proj = g.producer.get(node.input[0])
    if proj is None or proj.op_type != "MatMul" or proj.input[1] not in g.inits:
        return None
    return proj, nodes, scale


def _heads(g: _Graph, reshape: onnx.NodeProto, proj: onnx.NodeProto) -> tuple[int, int] | None:
    """(num_heads, head_size) from the Reshape's target shape ``[B, S, H, d]`` (a constant or a Concat; H may be
    -1, then it is the projection's width over d)."""
    shape = g.const(reshape.input[1])
    if shape is not None and shape.size == 4:
        h, d = int(shape[2]), int(shape[3])
    else:
        concat = g.producer.get(reshape.input[1])
        if concat is None or concat.op_type != "Concat" or len(concat.input) != 4:
            return None
        hc, dc = g.const(concat.input[2]), g.const(concat.input[3])
        if hc is None or dc is None or hc.size != 1 or dc.size != 1:
            return None
        h, d = int(hc.reshape(())), int(dc.reshape(()))
    width = int(g.inits[proj.input[1]].dims[-1])
    if d <= 0 or width % d:
        return None
    if h == -1:
        h = width // d
    return (h, d) if h > 0 and h * d == width else None


def _axes_of(g: _Graph, nodes: list[onnx.NodeProto], heads: int, head_size: int) -> dict[str, list[Any]]:
    """Each removed tensor's axes in terms of the attention input x ``[B, S, D]``: Reshape -> ``[x0, x1, H, d]``,
    then every Transpose permutes and every Mul keeps them."""
    out: dict[str, list[Any]] = {}
    for node in reversed(nodes):  # from the Reshape down
        if node.op_type == "Reshape":
            out[node.output[0]] = ["x0", "x1", heads, head_size]
        elif node.op_type == "Transpose" and node.input[0] in out:
            src = out[node.input[0]]
            out[node.output[0]] = [src[p] for p in _attr(node, "perm")]
        elif node.op_type == "Mul":
            inp = next((i for i in node.input if i in out), None)
            if inp is not None:
                out[node.output[0]] = list(out[inp])
    return out


def _match(g: _Graph, softmax: onnx.NodeProto) -> _Layer | str:
    """The attention core around ``softmax``, or a sentence saying why it does not match."""
    if _attr(softmax, "axis", -1) not in (-1, 3):
        return "softmax not over the last axis"
    add = g.producer.get(softmax.input[0])
    if add is None or add.op_type != "Add":
        return "no Add (position bias) before the Softmax"
    qk = bias = None
    for i in (0, 1):
        p = g.producer.get(add.input[i])
        if p is not None and p.op_type == "MatMul" and p.input[1] not in g.inits:
            qk, bias = p, add.input[1 - i]
            break
    if qk is None:
        return "the Softmax's Add has no QK^T MatMul"
    q_path = _head_path(g, qk.input[0], ((0, 2, 1, 3),))
    k_path = _head_path(g, qk.input[1], ((0, 2, 3, 1),)) or _head_path(g, qk.input[1], ((0, 1, 3, 2), (0, 2, 1, 3)))
    if q_path is None or k_path is None:
        return "Q or K is not Transpose(Reshape(MatMul(x, W)))"
    av = g.only_consumer(softmax.output[0])
    if av is None or av.op_type != "MatMul" or av.input[0] != softmax.output[0]:
        return "the Softmax does not feed one attention x V MatMul"
    v_path = _head_path(g, av.input[1], ((0, 2, 1, 3),))
    if v_path is None:
        return "V is not Transpose(Reshape(MatMul(x, W)))"
    t_out = g.only_consumer(av.output[0])
    if t_out is None or t_out.op_type != "Transpose" or tuple(_attr(t_out, "perm", ())) != (0, 2, 1, 3):
        return "attention x V is not transposed back to [B, S, H, d]"
    r_out = g.only_consumer(t_out.output[0])
    if r_out is None or r_out.op_type != "Reshape":
        return "the attention output is not reshaped to [B, S, H*d]"
    (q_proj, q_nodes, q_scale), (k_proj, k_nodes, k_scale), (v_proj, v_nodes, v_scale) = q_path, k_path, v_path
    if not (q_proj.input[0] == k_proj.input[0] == v_proj.input[0]):
        return "Q, K and V are not projections of one input (not self-attention)"
    if v_scale != 1.0:
        return "V is scaled"
    heads = _heads(g, q_nodes[-1], q_proj)
    if heads is None or heads != _heads(g, k_nodes[-1], k_proj) or heads != _heads(g, v_nodes[-1], v_proj):
        return "num_heads / head size not readable from the Reshapes"
    scale = q_scale * k_scale
    if not scale > 0:
        return f"attention scale {scale} (0 would mean 1/sqrt(d) to ORT)"
    if len(g.inits[q_proj.input[1]].dims) != 2:
        return f"{q_proj.name}: weight is not a matrix"
    # a removed node's output may be read outside the core only by Shape (rewired to x), or by a side Transpose
    # that only Shapes read (the first layer's K, whose length the position bias takes); anything else keeps it
    removed = [add, qk, softmax, av, t_out, r_out, *q_nodes, *k_nodes, *v_nodes]
    dims: dict[str, list[Any]] = {}
    for nodes in (q_nodes, k_nodes, v_nodes):
        dims.update(_axes_of(g, nodes, *heads))
    for tensor in list(dims):
        for user in g.consumers.get(tensor, []):
            if user.op_type == "Transpose" and user not in removed and all(u.op_type == "Shape" for u in g.consumers.get(user.output[0], [])):
                dims[user.output[0]] = [dims[tensor][p] for p in _attr(user, "perm")]
                removed.append(user)
    for node in removed:
        if node is r_out:
            continue
        for o in node.output:
            for user in g.consumers.get(o, []):
                if user in removed or (user.op_type == "Shape" and o in dims):
                    continue
                return f"{o} is used outside the attention core by {user.op_type} {user.name}"
    return _Layer(
        x=q_proj.input[0], q=q_proj.output[0], k=k_proj.output[0], v=v_proj.output[0], bias=bias, out=r_out.output[0],
        num_heads=heads[0], scale=scale, removed=removed, dims=dims, name=softmax.name,
    )


def _rewire_shapes(g: _Graph, layer: _Layer) -> str | None:
    """Point every ``Shape`` that reads a removed tensor at ``x``, with each ``Gather`` index mapped to x's axis.
    Returns a reason when one cannot be rewired (then nothing of this layer is changed)."""
    plans = []
    for tensor, axes in layer.dims.items():
        for shape in g.consumers.get(tensor, []):
            if shape.op_type != "Shape":
                continue
            if shape.attribute:
                return f"{shape.name}: Shape with start/end"
            gathers = g.consumers.get(shape.output[0], [])
            mapped = []
            for gather in gathers:
                index = g.const(gather.input[1]) if gather.op_type == "Gather" and len(gather.input) == 2 else None
                if index is None or index.ndim != 0 or _attr(gather, "axis", 0) != 0:
                    return f"{shape.name}: its output is not read by scalar Gathers"
                axis = axes[int(index) % len(axes)]
                if axis not in ("x0", "x1"):
                    return f"{shape.name}: reads a constant axis ({axis})"
                mapped.append((gather, int(axis[1])))
            plans.append((shape, mapped))
    for shape, mapped in plans:
        shape.input[0] = layer.x
        for gather, axis in mapped:
            name = f"{gather.name}/x_axis_{axis}"
            if name not in g.inits:
                init = numpy_helper.from_array(np.array(axis, dtype=np.int64), name)
                g.graph.initializer.append(init)
                g.inits[name] = init
            gather.input[1] = name
    return None


def _prune(g: _Graph) -> None:
    """Remove nodes nothing reads (up from the graph outputs), then initializers no node reads."""
    needed = {o.name for o in g.graph.output}
    keep = []
    for node in reversed(list(g.graph.node)):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
            for a in node.attribute:  # subgraphs (none in these encoders) would keep their outer inputs
                if a.type == onnx.AttributeProto.GRAPH:
                    needed.update(i for n in a.g.node for i in n.input)
    keep.reverse()
    del g.graph.node[:]
    g.graph.node.extend(keep)
    used = {i for n in g.graph.node for i in n.input}
    kept = [i for i in g.graph.initializer if i.name in used]
    del g.graph.initializer[:]
    g.graph.initializer.extend(kept)
    g.inits = {i.name: i for i in g.graph.initializer}
    g.refresh()


def position_bias_subgraphs(model: onnx.ModelProto) -> int:
    """How many times the graph computes a T5 position bias: Gathers from a ``relative_attention_bias`` table."""
    inits = {i.name for i in model.graph.initializer if "relative_attention_bias" in i.name}
    return sum(1 for n in model.graph.node if n.op_type == "Gather" and n.input and n.input[0] in inits)


def fuse(src: Path, dst: Path) -> dict[str, Any]:
    """Write ``src`` with every matching T5 attention core fused to ``dst``; return what was done (manifest).

    ``FusionError`` when no layer matched, or when the fused layers do not share one position bias.
    """
    model = onnx.load(str(src))
    g = _Graph(model)
    layers: list[_Layer] = []
    skipped: dict[str, str] = {}
    for softmax in [n for n in g.graph.node if n.op_type == "Softmax"]:
        found = _match(g, softmax)
        if isinstance(found, str):
            skipped[softmax.name] = found
            continue
        reason = _rewire_shapes(g, found)
        if reason is not None:
            skipped[softmax.name] = reason
            continue
        layers.append(found)
        g.refresh()
    if not layers:
        why = "; ".join(f"{k}: {v}" for k, v in list(skipped.items())[:3]) or "the graph has no Softmax"
        raise FusionError(f"no T5 attention matched ({why})")
    biases = Counter(layer.bias for layer in layers)
    if len(biases) != 1:
        raise FusionError(f"the fused layers read {len(biases)} different position biases, expected one shared tensor")
    for i, layer in enumerate(layers):
        node = helper.make_node(
            "MultiHeadAttention",
            [layer.q, layer.k, layer.v, "", "", layer.bias],
            [layer.out],
            name=f"T5Attention_{i}",
            domain=MS_DOMAIN,
            num_heads=layer.num_heads,
            scale=float(layer.scale),
        )
        for n in layer.removed:
            g.graph.node.remove(n)
        g.graph.node.append(node)
    _topological_sort(g.graph)
    _prune(g)
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    onnx.save(model, str(dst))
    return {
        "fused": "MultiHeadAttention",
        "layers": len(layers),
        "unmatched_softmax": skipped,
        "attention_bias": "one position-bias tensor (relative buckets + padding mask), computed once per batch, read by every layer",
        "position_bias_subgraphs": position_bias_subgraphs(model),
    }


def _topological_sort(graph: onnx.GraphProto) -> None:
    """Order nodes so that every input is produced before it is read (the fused node reads q, k, v and the bias)."""
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending = list(graph.node)
    ordered: list[onnx.NodeProto] = []
    while pending:
        rest = []
        for node in pending:
            if all(i in available for i in node.input):
                ordered.append(node)
                available.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise FusionError(f"the fused graph has a cycle or a missing input at {rest[0].op_type} {rest[0].name}")
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)
