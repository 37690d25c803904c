"""T5 attention fusion (``export.t5_attention``): MultiHeadAttention with one shared position bias, the same numbers
as the unfused graph, and a fallback with a message when the fusion does not match or misses the gate."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from export import optimize, t5_attention
from export.__main__ import main as export_main
from export.build import ExportOptions, export_bundle
from export.onnx_graph import export_onnx
from export.parity import calibration_inputs, run_batches
from tests.conftest import TINY


def ops(path: Path) -> Counter:
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def session_runner(path: Path):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda feeds: session.run(None, feeds)[0]


@pytest.fixture(scope="module")
def graphs(tmp_path_factory, tiny_model) -> dict[str, Path]:
    """The tiny model's plain graph, ORT's transformer optimizer on it (RMSNorm fused), and that plus the fusion."""
    folder = tmp_path_factory.mktemp("t5attn")
    plain = export_onnx(tiny_model, folder / "fp32.onnx")
    optimized = optimize.transformer_optimized(tiny_model, plain, folder / "fp32.opt.onnx")
    fused = optimize.t5_attention_fused(tiny_model, plain, optimized, folder / "fp32.t5.onnx")
    return {"plain": plain, "optimized": optimized.path, "fused": fused.path, "info": fused.info}


def test_every_layer_becomes_multi_head_attention_reading_one_position_bias(graphs, tiny_model):
    layers = tiny_model.auto_model.config.num_layers
    fused = onnx.load(str(graphs["fused"]))
    mha = [n for n in fused.graph.node if n.op_type == "MultiHeadAttention"]
    assert len(mha) == layers and "Softmax" not in ops(graphs["fused"])
    assert len({n.input[5] for n in mha}) == 1  # every layer reads the same attention_bias tensor
    assert all(helper.get_attribute_value(a) == tiny_model.auto_model.config.num_heads for n in mha for a in n.attribute if a.name == "num_heads")
    assert t5_attention.position_bias_subgraphs(fused) == 1  # the relative-position table is read once per batch
    info = graphs["info"]
    assert info["attention"]["layers"] == layers and info["attention"]["unmatched_softmax"] == {}
    assert {"MultiHeadAttention", "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization"} <= set(info["fused_ops"])
    assert info["nodes"]["before"] > info["nodes"]["after_optimizer"] > info["nodes"]["after"]


def test_fused_graph_computes_what_the_unfused_one_does(graphs, tiny_model):
    inputs = calibration_inputs(tiny_model.max_seq_length, 4)  # short and full-length rows, padded batches
    unfused = run_batches(session_runner(graphs["optimized"]), tiny_model.tokenizer, inputs, 8)
    fused = run_batches(session_runner(graphs["fused"]), tiny_model.tokenizer, inputs, 8)
    assert np.isfinite(fused).all() and np.abs(fused - unfused).max() <= 1e-6


def test_export_keeps_the_fused_graph_and_golden_vectors_hold(tmp_path, golden_inputs, golden_vectors, tiny_model):
    out = tmp_path / "tiny.onnx"
    manifest = export_bundle(TINY, out, ExportOptions(precision="fp32"))
    assert manifest["graph"]["applied"] == "onnxruntime.transformers.optimizer + export.t5_attention"
    assert manifest["graph"]["rejected"] == [] and manifest["parity"]["max_abs_diff"] <= 1e-5
    got = run_batches(session_runner(out), tiny_model.tokenizer, golden_inputs, 32)
    assert np.abs(got - golden_vectors).max() <= 1e-5


def test_int8_engine_keeps_the_fused_attention(tmp_path):
    out = tmp_path / "tiny-int8.onnx"
    manifest = export_bundle(TINY, out, ExportOptions(precision="int8"))
    assert manifest["graph"]["fp32_graph"]["applied"] == "onnxruntime.transformers.optimizer + export.t5_attention"
    assert ops(out)["MultiHeadAttention"] == 2 and manifest["parity"]["passed"]


def test_no_fuse_attention_keeps_the_plain_attention(tmp_path):
    out = tmp_path / "tiny.onnx"
    assert export_main([str(TINY), "--out", str(out), "--no-fuse-attention"]) == 0
    graph = json.loads(Path(f"{out}.manifest.json").read_text())["graph"]
    assert graph["applied"] == "onnxruntime.transformers.optimizer"
    assert ops(out)["MultiHeadAttention"] == 0 and ops(out)["Softmax"] == 2 and ops(out)["SkipSimplifiedLayerNormalization"] > 0


def test_a_fusion_that_does_not_match_falls_back_with_a_message(tmp_path, monkeypatch, capsys):
    def no_match(src: Path, dst: Path) -> dict:
        raise t5_attention.FusionError("no T5 attention matched (the graph has no Softmax)")

    monkeypatch.setattr(t5_attention, "fuse", no_match)
    manifest = export_bundle(TINY, tmp_path / "tiny.onnx", ExportOptions(precision="fp32"))
    graph = manifest["graph"]
    assert graph["applied"] == "onnxruntime.transformers.optimizer" and manifest["parity"]["passed"]
    assert graph["rejected"][0]["candidate"] == "t5_attention" and "no T5 attention matched" in graph["rejected"][0]["reason"]
    err = capsys.readouterr().err
    assert "'t5_attention' not used" in err and "falling back" in err


def test_a_fusion_outside_the_gate_falls_back_with_a_message(tmp_path, monkeypatch, capsys):
    real_fuse = t5_attention.fuse

    def wrong_scale(src: Path, dst: Path) -> dict:  # a fused graph that computes something else
        info = real_fuse(src, dst)
        model = onnx.load(str(dst))
        for node in model.graph.node:
            if node.op_type == "MultiHeadAttention":
                for a in node.attribute:
                    if a.name == "scale":
                        a.f = 0.5
        onnx.save(model, str(dst))
        return info

    monkeypatch.setattr(t5_attention, "fuse", wrong_scale)
    manifest = export_bundle(TINY, tmp_path / "tiny.onnx", ExportOptions(precision="fp32"))
    assert manifest["graph"]["applied"] == "onnxruntime.transformers.optimizer"
    assert "max abs" in manifest["graph"]["rejected"][0]["reason"]
    assert "parity gate" in capsys.readouterr().err


def test_fuse_says_why_on_a_graph_without_attention(tmp_path):
    node = helper.make_node("Relu", ["x"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph), str(tmp_path / "relu.onnx"))
    with pytest.raises(t5_attention.FusionError, match="no T5 attention matched.*no Softmax"):
        t5_attention.fuse(tmp_path / "relu.onnx", tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()
