"""Checkpoint -> fp32 ONNX graph with the instruction-masked pooling, Dense and L2 normalization inside it.

The graph is ``InstructorModel.forward`` traced by ``torch.onnx.export`` (TorchScript path, which handles HF T5's
relative position bias with dynamic sequence length): inputs ``input_ids``, ``attention_mask``,
``instruction_count`` (int64), output ``sentence_embedding`` float32 ``[batch, dim]``.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import onnx
import torch

from runtime.bundle import INPUT_NAMES, OUTPUT_NAME
from trainer.model import InstructorModel

DEFAULT_OPSET = 17


def example_features(model: InstructorModel) -> tuple[torch.Tensor, ...]:
    """Two rows of different lengths, one with an instruction: enough for the tracer to see every branch."""
    feats = model.tokenizer(["a short text", ["Represent the sentence for retrieval: ", "a longer text with more tokens"]])
    return tuple(torch.from_numpy(feats[name]) for name in INPUT_NAMES)


@contextmanager
def eager_attention(model: InstructorModel) -> Iterator[None]:
    """Trace BERT-family encoders with HF's eager attention, then restore the model's own.

    Torch's SDPA traces to a decomposition (scaled q and k, boolean mask, NaN guard) that ONNX Runtime's transformer
    optimizer does not recognize, so ``Attention`` and ``EmbedLayerNormalization`` were never fused on MiniLM; the
    eager pattern fuses (same math: parity is checked by the fp32 gate). T5 keeps its own: ORT fuses no T5 encoder
    attention with relative position bias either way.
    """
    encoder = model.auto_model
    before = getattr(encoder.config, "_attn_implementation", None)
    switch = model.architecture not in ("t5", "mt5") and before not in (None, "eager") and hasattr(encoder, "set_attn_implementation")
    if switch:
        encoder.set_attn_implementation("eager")
    try:
        yield
    finally:
        if switch:
            encoder.set_attn_implementation(before)


def export_onnx(model: InstructorModel, path: str | Path, opset: int = DEFAULT_OPSET) -> Path:
    """Write the fp32 graph of ``model`` to ``path`` (dynamic batch and sequence)."""
    path = Path(path)
    model = model.eval().to("cpu", torch.float32)
    dynamic_axes = {
        "input_ids": {0: "batch", 1: "sequence"},
        "attention_mask": {0: "batch", 1: "sequence"},
        "instruction_count": {0: "batch"},
        OUTPUT_NAME: {0: "batch"},
    }
    with warnings.catch_warnings(), torch.no_grad(), eager_attention(model):
        warnings.simplefilter("ignore")  # tracer warnings about python ints in HF code; shapes are checked by parity
        torch.onnx.export(
            model,
            example_features(model),
            str(path),
            input_names=list(INPUT_NAMES),
            output_names=[OUTPUT_NAME],
            dynamic_axes=dynamic_axes,
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    return path


# The traced graph names nodes by module scope: the encoder's nodes sit under this prefix, the head's do not.
ENCODER_SCOPE = "/auto_model/"


def ff_width(config: Any) -> int:
    """The FF inner width (T5 ``d_ff``, BERT ``intermediate_size``), which identifies the FF MatMuls by weight shape."""
    return int(getattr(config, "d_ff", None) or config.intermediate_size)


def encoder_matmuls(graph: onnx.GraphProto) -> dict[str, tuple[int, ...] | None]:
    """Encoder MatMul node name -> shape of its weight initializer ``[in, out]`` (None for activation x activation)."""
    inits = {i.name: tuple(i.dims) for i in graph.initializer}
    return {
        n.name: inits.get(n.input[1])
        for n in graph.node
        if n.op_type == "MatMul" and n.name.startswith(ENCODER_SCOPE)
    }
