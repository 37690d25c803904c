"""Which ops of an INSTRUCTOR graph run in fp16/bf16 and which stay fp32: the one rule behind every mixed-precision
engine, applied op by op (in topological order) to the ONNX graph (``export.mixed_precision``) and to the
``torch.export`` graph (``export.fx_precision``).

Low precision: the encoder's projections (q, k, v, attention output, FF input), its products of two activations
(QK^T and attention x V, or a fused attention op that computes both), and the layout ops and constant scalings
fed by them, so that no cast round trip sits between two low-precision ops. Everything else stays fp32: the
residual stream, RMSNorm/LayerNorm math, softmax and position bias, the FF output projection (``wo``, whose outputs
exceed 65504 in T5 models and overflow fp16), the embedding lookup, and the whole head (pooling sums, Dense, L2
norm). A low-precision op computes all its float inputs in the low precision (weights used only by such ops are
stored in it); an fp32 op reads low-precision inputs cast back to fp32.
"""

from __future__ import annotations

PROJECTION = "projection"  # a product with a weight matrix (Linear, MatMul with an initializer)
PRODUCT = "product"  # a product of two activations, or a fused attention op (q.k^T, softmax, x v in one kernel)
LAYOUT = "layout"  # data movement only (reshape, transpose, ...)
SCALING = "scaling"  # Add / Mul / Div, low only when the other operand is a constant
OTHER = "other"  # everything else: always fp32

FP32_ISLANDS = (
    "residual stream, RMSNorm/LayerNorm, softmax + position bias, FF output (wo), embeddings, pooling sums, Dense, L2 norm"
)

# The same kinds named in each graph's vocabulary: ONNX op types, and ATen op names (``OpOverloadPacket.__name__``).
ONNX_KINDS = {
    "MatMul": PROJECTION,  # PRODUCT when its second input is not a weight (see ``export.mixed_precision``)
    **dict.fromkeys(("Reshape", "Transpose", "Squeeze", "Unsqueeze", "Identity", "Flatten"), LAYOUT),
    **dict.fromkeys(("Add", "Mul", "Div"), SCALING),
}
ATEN_KINDS = {
    "linear": PROJECTION,
    **dict.fromkeys(("matmul", "bmm", "scaled_dot_product_attention"), PRODUCT),
    **dict.fromkeys(
        ("view", "reshape", "_unsafe_view", "transpose", "permute", "t", "squeeze", "unsqueeze", "flatten", "alias",
         "contiguous", "clone"),
        LAYOUT,
    ),
    **dict.fromkeys(("add", "mul", "div"), SCALING),
}


def runs_low(
    kind: str,
    *,
    in_encoder: bool,
    fed_by_low: bool,
    weight_in_features: int | None = None,
    ff_width: int = 0,
    other_operand_constant: bool = False,
) -> bool:
    """Whether one op computes in the low precision.

    ``fed_by_low``: its (first, for scalings the non-constant) data input comes from a low-precision op;
    ``weight_in_features``: a projection's input width (the FF output projection's is the FF width, ``ff_width``).
    """
    if kind == PROJECTION:
        return in_encoder and weight_in_features != ff_width
    if kind == PRODUCT:
        return in_encoder
    if kind == LAYOUT:
        return fed_by_low
    if kind == SCALING:
        return fed_by_low and other_operand_constant
    return False
