"""fp32 graph optimization for ONNX Runtime, kept only where it keeps the result.

Candidates, best first: for T5 (INSTRUCTOR), ONNX Runtime's transformer optimizer followed by this project's T5
attention fusion (``export.t5_attention``: ``MultiHeadAttention`` with the shared position bias as
``attention_bias``); then ONNX Runtime's transformer optimizer alone (``onnxruntime.transformers.optimizer``, python
fusions only, ``opt_level=0``, so the saved graph holds portable ONNX + ``com.microsoft`` ops and no CPU-specific
layouts); then ORT's offline ``ORT_ENABLE_BASIC`` level (constant folding and redundant-node elimination,
hardware-agnostic). ``export.build`` checks each against PyTorch and keeps the first that passes the fp32 gate; a
candidate that fails (no match, or outside the gate) is reported on stderr and the next one is tried; the manifest
records which one was applied and why the others were not.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from trainer.model import InstructorModel

# onnxruntime.transformers model types: on T5 the optimizer fuses RMSNorm (+ residual Add) only, its attention fusion
# needs a RelativePositionBias op that ORT has for CUDA only (export.t5_attention does the attention); BERT-family
# encoders get Attention, SkipLayerNormalization and Gelu fusions.
OPTIMIZER_MODEL_TYPES = {"t5": "t5", "mt5": "t5", "bert": "bert", "roberta": "bert", "xlm-roberta": "bert"}
T5_ARCHITECTURES = ("t5", "mt5")


@dataclass
class GraphCandidate:
    """One optimized graph to try, with what the manifest should say about it."""

    path: Path
    info: dict[str, Any] = field(default_factory=dict)


def op_counts(path: Path) -> dict[str, int]:
    model = onnx.load(str(path), load_external_data=False)
    return dict(sorted(Counter(n.op_type for n in model.graph.node).items()))


def transformer_optimized(model: InstructorModel, src: Path, dst: Path) -> GraphCandidate:
    """``onnxruntime.transformers.optimizer.optimize_model`` with the encoder's heads and hidden size."""
    from onnxruntime.transformers.optimizer import optimize_model

    cfg = model.auto_model.config
    model_type = OPTIMIZER_MODEL_TYPES[model.architecture]
    heads = int(cfg.num_attention_heads)  # T5Config maps it to num_heads
    optimized = optimize_model(
        str(src), model_type=model_type, num_heads=heads, hidden_size=model.hidden_size, opt_level=0, use_gpu=False
    )
    optimized.save_model_to_file(str(dst))
    before, after = op_counts(src), op_counts(dst)
    fused = {op: n for op, n in after.items() if op not in before}
    info = {
        "applied": "onnxruntime.transformers.optimizer",
        "model_type": model_type,
        "opt_level": 0,
        "fused_ops": fused,
        "nodes": {"before": sum(before.values()), "after": sum(after.values())},
    }
    return GraphCandidate(dst, info)


def t5_attention_fused(model: InstructorModel, src: Path, optimized: GraphCandidate, dst: Path) -> GraphCandidate:
    """ORT's transformer optimizer (``optimized``), then ``export.t5_attention``; ``FusionError`` if nothing matched."""
    from export import t5_attention

    attention = t5_attention.fuse(optimized.path, dst)
    before, after = op_counts(src), op_counts(dst)
    info = {
        **optimized.info,
        "applied": "onnxruntime.transformers.optimizer + export.t5_attention",
        "fused_ops": {op: n for op, n in after.items() if op not in before},
        "nodes": {"before": sum(before.values()), "after_optimizer": optimized.info["nodes"]["after"], "after": sum(after.values())},
        "attention": attention,
    }
    return GraphCandidate(dst, info)


def ort_offline_optimized(src: Path, dst: Path) -> GraphCandidate:
    """ORT's own offline optimization at the hardware-agnostic ``ORT_ENABLE_BASIC`` level."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts.optimized_model_filepath = str(dst)
    ort.InferenceSession(str(src), opts, providers=["CPUExecutionProvider"])
    before, after = op_counts(src), op_counts(dst)
    info = {
        "applied": "onnxruntime offline graph optimization",
        "level": "ORT_ENABLE_BASIC",
        "nodes": {"before": sum(before.values()), "after": sum(after.values())},
    }
    return GraphCandidate(dst, info)


def candidates(model: InstructorModel, src: Path, workdir: Path, fuse_attention: bool = True) -> list[tuple[str, Any]]:
    """(label, thunk) pairs, best first; each thunk writes its graph and returns a ``GraphCandidate``.

    ``fuse_attention=False`` leaves T5's attention as plain ops (the unfused engine, for comparison)."""
    cache: dict[str, GraphCandidate] = {}

    def optimizer() -> GraphCandidate:  # shared by the T5 fusion and its fallback: run once
        if "optimizer" not in cache:
            cache["optimizer"] = transformer_optimized(model, src, workdir / "fp32.opt.onnx")
        return cache["optimizer"]

    out: list[tuple[str, Any]] = []
    if fuse_attention and model.architecture in T5_ARCHITECTURES:
        out.append(("t5_attention", lambda: t5_attention_fused(model, src, optimizer(), workdir / "fp32.t5.onnx")))
    out += [
        ("transformer_optimizer", optimizer),
        ("ort_basic", lambda: ort_offline_optimized(src, workdir / "fp32.basic.onnx")),
    ]
    return out
