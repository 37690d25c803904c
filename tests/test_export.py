"""Export: fp32/int8/fp16/bf16 ONNX bundles checked against PyTorch and the golden vectors, the self-verification
gate, the manifest, and clear errors. TensorRT builds run only where CUDA and TensorRT are (bench/gpu_check.sh)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto

import export.build as build
from export.__main__ import main as export_main
from export.build import ExportOptions, export_bundle
from export.mixed_precision import convert as mixed_convert
from export.onnx_graph import export_onnx, ff_width
from export.parity import ParityReport, calibration_inputs, check_gate, compare, run_batches
from export import quantize
from export.tensorrt import Profile
from runtime.bundle import load_manifest, source_onnx_path, tokenizer_path
from runtime.tokenization import INSTRUCTION_RULES_VERSION
from tests.conftest import FIXTURES, TINY

STSB = FIXTURES / "stsb-dev-200.jsonl"


def run_bundle(engine: Path, inputs: list, batch_size: int) -> np.ndarray:
    """Encode with an exported bundle alone: its tokenizer sidecar and ONNX Runtime on the CPU."""
    manifest = load_manifest(engine, verify_engine=True)
    tokenizer = manifest.tokenizer()
    session = ort.InferenceSession(str(engine), providers=["CPUExecutionProvider"])
    out = [session.run(None, tokenizer(inputs[i : i + batch_size]))[0] for i in range(0, len(inputs), batch_size)]
    return np.concatenate(out)


@pytest.fixture(scope="module")
def tiny_fp32(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny") / "tiny.onnx"
    export_bundle(TINY, out, ExportOptions(precision="fp32"))
    return out


@pytest.fixture(scope="module")
def minilm_bundles(tmp_path_factory, minilm_dir) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("minilm")
    bundles = {}
    for precision in ("fp32", "int8"):
        bundles[precision] = folder / f"minilm-{precision}.onnx"
        export_bundle(minilm_dir, bundles[precision], ExportOptions(precision=precision))
    return bundles


@pytest.fixture(scope="module")
def tiny_graph(tmp_path_factory, tiny_model) -> Path:
    """The plain fp32 graph of the tiny model, for the graph-pass tests."""
    return export_onnx(tiny_model, tmp_path_factory.mktemp("graph") / "fp32.onnx")


# ---- fp32 -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_size", [1, 32])
def test_tiny_fp32_equals_golden_vectors(tiny_fp32, golden_inputs, golden_vectors, batch_size):
    got = run_bundle(tiny_fp32, golden_inputs, batch_size)
    assert got.shape == golden_vectors.shape
    assert np.abs(got - golden_vectors).max() <= 1e-5


def test_tiny_fp32_fuses_rms_norm_and_t5_attention(tiny_fp32):
    manifest = json.loads(Path(f"{tiny_fp32}.manifest.json").read_text())
    graph = manifest["graph"]
    assert graph["applied"] == "onnxruntime.transformers.optimizer + export.t5_attention" and graph["model_type"] == "t5"
    assert graph["fused_ops"].get("SkipSimplifiedLayerNormalization", 0) > 0  # RMSNorm + residual fused
    ops = {n.op_type for n in onnx.load(str(tiny_fp32)).graph.node}
    assert "Log" in ops and "MultiHeadAttention" in ops  # relative position buckets kept, attention fused
    parity = manifest["parity"]
    long_rows = 4  # the calibration set ends with rows of max_seq_length tokens (relative distances > 128)
    assert parity["rows"] == len(calibration_inputs(512, long_rows)) and parity["passed"]
    assert parity["max_abs_diff"] <= 1e-5


def test_manifest_is_complete(tiny_fp32):
    manifest = load_manifest(tiny_fp32, verify_engine=True).data
    assert manifest["engine"] == {
        "kind": "onnx",
        "file": "tiny.onnx",
        "bytes": tiny_fp32.stat().st_size,
        "sha256": manifest["engine"]["sha256"],
    }
    assert manifest["source"]["checkpoint"] == str(TINY.resolve()) and len(manifest["source"]["sha256"]) == 64
    assert manifest["architecture"] == "t5" and manifest["embedding_dim"] == 32 and manifest["hidden_size"] == 64
    assert manifest["max_seq_length"] == 512 and manifest["precision"] == "fp32"
    assert manifest["instruction_rules"] == INSTRUCTION_RULES_VERSION
    assert manifest["tokenizer"]["file"] == tokenizer_path(tiny_fp32).name
    assert [(i["name"], i["dtype"], i["shape"]) for i in manifest["inputs"]] == [
        ("input_ids", "int64", ["batch", "sequence"]),
        ("attention_mask", "int64", ["batch", "sequence"]),
        ("instruction_count", "int64", ["batch"]),
    ]
    assert manifest["outputs"] == [{"name": "sentence_embedding", "dtype": "float32", "shape": ["batch", 32]}]
    assert {"torch", "transformers", "onnx", "onnxruntime", "instructor-stack"} <= set(manifest["exporter"])
    parity = manifest["parity"]
    for key in ("rows", "min_cosine", "mean_cosine", "max_abs_diff", "nonfinite_rows", "reference", "runner", "gate"):
        assert key in parity
    assert parity["gate"] == {"max_abs": 1e-5} and parity["nonfinite_rows"] == 0
    graph = onnx.load(str(tiny_fp32))
    assert [i.name for i in graph.graph.input] == ["input_ids", "attention_mask", "instruction_count"]
    assert graph.opset_import[0].version >= 17
    leftovers = [p.name for p in tiny_fp32.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_minilm_fp32_equals_pytorch(minilm_bundles, minilm_model):
    manifest = load_manifest(minilm_bundles["fp32"]).data
    assert manifest["architecture"] == "bert" and manifest["parity"]["max_abs_diff"] <= 1e-5
    inputs = calibration_inputs(minilm_model.max_seq_length, 2)
    got = run_bundle(minilm_bundles["fp32"], inputs, 16)
    assert np.abs(got - minilm_model.encode(inputs, batch_size=16)).max() <= 1e-5


# ---- int8 -------------------------------------------------------------------------------------------------------


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def test_int8_minilm_cosine_and_stsb_spearman(minilm_bundles, minilm_model):
    manifest = load_manifest(minilm_bundles["int8"]).data
    assert manifest["precision"] == "int8" and manifest["parity"]["min_cosine"] >= 0.99
    assert manifest["graph"]["quantized_matmuls"] > 0
    pairs = [json.loads(line) for line in STSB.read_text(encoding="utf-8").splitlines()]
    assert len(pairs) == 200
    sentences = [p["sentence1"] for p in pairs] + [p["sentence2"] for p in pairs]
    gold = np.array([p["score"] for p in pairs])
    scores = {}
    for precision, engine in minilm_bundles.items():
        emb = run_bundle(engine, sentences, 32)
        scores[precision] = spearman((emb[:200] * emb[200:]).sum(axis=1), gold)
        if precision == "int8":
            assert compare(minilm_model.encode(sentences, batch_size=32), emb).min_cos >= 0.99
    assert scores["fp32"] > 0.8  # the real model: STS-B dev is around 0.87
    assert abs(scores["int8"] - scores["fp32"]) <= 0.01


def test_int8_dynamic_quantizes_encoder_weights_and_keeps_head_fp32(tiny_graph, tmp_path):
    src = quantize.prepare(tiny_graph, tmp_path / "src.onnx")
    info = quantize.quantize(src, tmp_path / "q.onnx", quantize.Recipe("dynamic", per_channel=True))
    graph = onnx.load(str(tmp_path / "q.onnx")).graph
    ops = [n.op_type for n in graph.node]
    assert info["quantized_matmuls"] == 12  # q, k, v, o, wi, wo in 2 layers
    assert ops.count("MatMulInteger") + ops.count("DynamicQuantizeMatMul") == 12
    inits = {i.name for i in graph.initializer}
    fp32_weights = [n.name for n in graph.node if n.op_type == "MatMul" and n.input[1] in inits]
    assert fp32_weights == info["fp32_matmuls"] == ["/dense/MatMul"]  # the head
    assert quantize.Recipe("dynamic", True, keep_fp32=("a", "b")).label == "dynamic+per_channel+2_fp32"


def tiny_calibration(tiny_model) -> list[dict[str, np.ndarray]]:
    inputs = calibration_inputs(tiny_model.max_seq_length, 4)
    return [tiny_model.tokenizer(inputs[i : i + 16]) for i in range(0, len(inputs), 16)]


def golden_parity(path: Path, tiny_model, golden_inputs, golden_vectors):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return compare(golden_vectors, run_batches(lambda f: session.run(None, f)[0], tiny_model.tokenizer, golden_inputs, 16))


@pytest.mark.parametrize("recipe", [quantize.Recipe("dynamic", True), quantize.Recipe("dynamic", False), quantize.Recipe("static", True)], ids=lambda r: r.label)
def test_int8_recipes_give_the_golden_vectors_within_the_int8_gate(recipe, tiny_graph, tiny_model, golden_inputs, golden_vectors, tmp_path):
    src = quantize.prepare(tiny_graph, tmp_path / "src.onnx")
    quantize.quantize(src, tmp_path / "q.onnx", recipe, lambda: tiny_calibration(tiny_model))
    parity = golden_parity(tmp_path / "q.onnx", tiny_model, golden_inputs, golden_vectors)
    assert parity.nonfinite_rows == 0 and parity.min_cos >= 0.99, parity


def test_static_calibration_rows_are_unpadded_single_rows(tiny_model):
    batches = tiny_calibration(tiny_model)
    rows = list(quantize.single_rows(batches))
    assert len(rows) == sum(len(b["input_ids"]) for b in batches)
    first = batches[0]
    length = int(first["attention_mask"][1].sum())
    assert rows[1]["input_ids"].shape == (1, length) and rows[1]["attention_mask"].all()
    assert np.array_equal(rows[1]["input_ids"][0], first["input_ids"][1, :length])
    assert rows[1]["instruction_count"].tolist() == [first["instruction_count"][1]]


def test_int8_static_calibration_one_batch_at_a_time_gives_the_same_ranges(tiny_graph, tiny_model, tmp_path, monkeypatch):
    """Strided calibration bounds memory to one row; its merged min/max must equal ORT's all-at-once ranges."""
    import onnxruntime.quantization as ortq
    from onnx import numpy_helper

    src = quantize.prepare(tiny_graph, tmp_path / "src.onnx")
    feeds = lambda: tiny_calibration(tiny_model)  # noqa: E731
    quantize.quantize(src, tmp_path / "strided.onnx", quantize.Recipe("static", True), feeds)
    all_at_once = ortq.quantize_static
    monkeypatch.setattr(ortq, "quantize_static", lambda *a, **k: all_at_once(*a, **{**k, "extra_options": {}}))
    quantize.quantize(src, tmp_path / "whole.onnx", quantize.Recipe("static", True), feeds)

    def qparams(path: Path) -> dict[str, np.ndarray]:
        return {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer if i.name.endswith(("_scale", "_zero_point"))}

    strided, whole = qparams(tmp_path / "strided.onnx"), qparams(tmp_path / "whole.onnx")
    assert len(tiny_calibration(tiny_model)) > 1 and strided.keys() == whole.keys() and len(strided) > 10
    assert all(np.array_equal(strided[k], whole[k]) for k in strided)


def test_int8_static_recipe_quantizes_activations_and_attention_from_calibration(tiny_graph, tiny_model, tmp_path):
    src = quantize.prepare(tiny_graph, tmp_path / "src.onnx")
    info = quantize.quantize(src, tmp_path / "q.onnx", quantize.Recipe("static", True), lambda: tiny_calibration(tiny_model))
    graph = onnx.load(str(tmp_path / "q.onnx")).graph
    quantized_inputs = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    matmuls = [n for n in graph.node if n.op_type == "MatMul" and n.name.startswith("/auto_model/")]
    assert len(matmuls) == 16  # 12 with weights + QK^T and attention x V in 2 layers
    assert all(set(n.input) <= quantized_inputs for n in matmuls)  # both operands int8, attention's too
    assert info["quantized_ops"]["QuantizeLinear"] >= 16


def test_int8_export_measures_every_recipe_and_keeps_the_fastest_that_passes(tmp_path):
    out = tmp_path / "tiny-int8.onnx"
    manifest = export_bundle(TINY, out, ExportOptions(precision="int8"))
    graph = manifest["graph"]
    measured = {m["recipe"]: m for m in graph["measured"]}
    assert measured["fp32 (not quantized)"]["calibration_set_seconds"] > 0
    tried = {"dynamic+per_channel", "dynamic+per_tensor", "static+per_channel"}
    assert tried <= set(measured)
    for label in tried:
        assert 0.9 < measured[label]["min_cosine"] <= 1.0
    passing = [m for m in measured.values() if m.get("passed")]
    assert passing and all(m["calibration_set_seconds"] > 0 for m in passing)  # every passing candidate raced
    assert graph["recipe"] == min(passing, key=lambda m: m["calibration_set_seconds"])["recipe"]
    assert manifest["parity"]["passed"] and manifest["parity"]["min_cosine"] >= 0.99
    assert graph["fp32_graph"]["applied"] == "onnxruntime.transformers.optimizer + export.t5_attention"  # after the fp32 fusions
    assert "sensitivity" not in graph  # a full quantization passed: no MatMul had to stay fp32


# ---- fp16 / bf16 ------------------------------------------------------------------------------------------------


def output_types(path: Path) -> dict[str, int]:
    """Node name -> elem type of its first output (from ONNX shape inference)."""
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    types = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.value_info, *model.graph.output]}
    return {n.name: types.get(n.output[0]) for n in model.graph.node}


@pytest.mark.parametrize(("precision", "low"), [("fp16", TensorProto.FLOAT16), ("bf16", TensorProto.BFLOAT16)])
def test_mixed_precision_graph_keeps_fp32_islands(tiny_graph, tmp_path, precision, low):
    info = mixed_convert(tiny_graph, tmp_path / f"{precision}.onnx", precision, 128)
    types = output_types(tmp_path / f"{precision}.onnx")
    scope = "/auto_model/encoder/block.0/"
    for name in ("layer.0/SelfAttention/q/MatMul", "layer.0/SelfAttention/o/MatMul", "layer.1/DenseReluDense/wi/MatMul"):
        assert types[scope + name] == low, name
    assert types[scope + "layer.1/DenseReluDense/wo/MatMul"] == TensorProto.FLOAT
    assert info["fp32_matmuls"] == [f"/auto_model/encoder/block.{i}/layer.1/DenseReluDense/wo/MatMul" for i in (0, 1)]
    fp32_ops = {"Pow", "ReduceMean", "Sqrt", "Softmax", "ReduceSum", "ReduceL2", "Gather", "Log"}
    for name, elem in types.items():
        op = name.rsplit("/", 1)[-1].rstrip("_0123456789")
        if op in fp32_ops and elem in (TensorProto.FLOAT16, TensorProto.BFLOAT16):
            pytest.fail(f"{name} runs in low precision")
    residual_adds = [n for n in types if n.startswith(scope) and n.endswith("layer.1/Add")]
    assert residual_adds and all(types[n] == TensorProto.FLOAT for n in residual_adds)
    assert types["/dense/MatMul"] == TensorProto.FLOAT


def test_fp16_tiny_export_passes_gate_on_cpu(tmp_path):
    manifest = export_bundle(TINY, tmp_path / "tiny16.onnx", ExportOptions(precision="fp16"))
    parity = manifest["parity"]
    assert parity["passed"] and parity["min_cosine"] >= 0.999 and parity["nonfinite_rows"] == 0
    assert manifest["graph"]["low_precision"] == "float16"


def test_bf16_onnx_without_cuda_ep_says_what_to_install(tmp_path, capsys):
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed: bf16 .onnx can be verified here")
    assert export_main([str(TINY), "--out", str(tmp_path / "x.onnx"), "--precision", "bf16"]) == 3  # the environment
    assert "onnxruntime-gpu" in capsys.readouterr().err and list(tmp_path.iterdir()) == []


def ff_outputs(graph_path: Path, feats: dict[str, np.ndarray], elem_type: int) -> np.ndarray:
    """Run a graph with every ``wo`` MatMul output exposed as an extra graph output of ``elem_type``."""
    model = onnx.load(str(graph_path))
    names = [n.output[0] for n in model.graph.node if n.name.endswith("DenseReluDense/wo/MatMul")]
    model.graph.output.extend(onnx.helper.make_tensor_value_info(name, elem_type, None) for name in names)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.concatenate([o.ravel().astype(np.float32) for o in session.run(names, feats)])


def test_overflow_fixture_breaks_naive_fp16_but_not_ours(tmp_path):
    """FF outputs beyond 65504: inf in a naive fp16 graph, finite fp32 in ours, and ours passes the gate.

    ONNX Runtime's CPU EP computes fp16 nodes in fp32 and rounds only where a tensor must be fp16, so the wo
    outputs are exposed as graph outputs of the graph's own type; end to end on fp16 hardware: bench/gpu_check.sh.
    """
    from onnxruntime.transformers.float16 import convert_float_to_float16

    from bench.shapes import make_overflow_checkpoint
    from trainer.model import InstructorModel

    ckpt = make_overflow_checkpoint(tmp_path / "overflow")
    model = InstructorModel.from_pretrained(ckpt)
    inputs = calibration_inputs(model.max_seq_length, 2)
    feats = model.tokenizer(inputs[:16])
    fp32 = export_onnx(model, tmp_path / "fp32.onnx")
    peak = np.abs(ff_outputs(fp32, feats, TensorProto.FLOAT)).max()
    assert peak > 65504 and np.isfinite(model.encode(inputs, batch_size=16)).all()

    naive = convert_float_to_float16(onnx.load(str(fp32)), keep_io_types=True)
    onnx.save(naive, str(tmp_path / "naive16.onnx"))
    assert np.isinf(ff_outputs(tmp_path / "naive16.onnx", feats, TensorProto.FLOAT16)).any()

    mixed_convert(fp32, tmp_path / "ours16.onnx", "fp16", ff_width(model.auto_model.config))
    ours = ff_outputs(tmp_path / "ours16.onnx", feats, TensorProto.FLOAT)
    assert np.isfinite(ours).all() and np.abs(ours).max() > 65504

    manifest = export_bundle(ckpt, tmp_path / "ours16-bundle.onnx", ExportOptions(precision="fp16"))
    assert manifest["parity"]["passed"] and manifest["parity"]["nonfinite_rows"] == 0
    assert manifest["parity"]["min_cosine"] >= 0.999


# ---- the gate and errors ----------------------------------------------------------------------------------------


def test_gate_refuses_pooling_without_instruction_mask(tmp_path, monkeypatch, capsys):
    """A broken export (the graph pools the instruction tokens too) must fail the gate and leave nothing behind."""
    real_export = build.export_onnx

    def broken_export(model, path, opset):
        head = model.head
        model.head = lambda hidden, mask, count: head(hidden, mask, torch.zeros_like(count))
        try:
            return real_export(model, path, opset)
        finally:
            del model.head

    monkeypatch.setattr(build, "export_onnx", broken_export)
    out_dir = tmp_path / "out"
    assert export_main([str(TINY), "--out", str(out_dir / "broken.onnx")]) == 1
    err = capsys.readouterr().err
    assert "parity gate failed for fp32" in err and "no engine written" in err
    assert list(out_dir.iterdir()) == []


def test_corrupt_weights_give_clear_error(tiny_copy, tmp_path, capsys):
    weights = tiny_copy / "pytorch_model.bin"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert export_main([str(tiny_copy), "--out", str(tmp_path / "x.onnx")]) == 1  # bad input data: the checkpoint
    err = capsys.readouterr().err
    assert str(tiny_copy) in err and "cannot load the t5 encoder weights" in err


@pytest.mark.parametrize(("missing", "message"), [("modules.json", "modules.json: file not found"), ("2_Dense/config.json", "2_Dense/config.json: file not found")])
def test_missing_checkpoint_file_gives_clear_error(tiny_copy, tmp_path, capsys, missing, message):
    (tiny_copy / missing).unlink()
    assert export_main([str(tiny_copy), "--out", str(tmp_path / "x.onnx")]) == 1  # bad input data: the checkpoint
    assert message in capsys.readouterr().err


def test_unwritable_output_gives_clear_error(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert export_main([str(TINY), "--out", str(blocker / "x.onnx")]) == 2
    err = capsys.readouterr().err
    assert "cannot write the engine" in err and str(blocker) in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder_gives_clear_error(tmp_path, capsys):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        assert export_main([str(TINY), "--out", str(folder / "x.onnx")]) == 3  # permissions: the environment
    finally:
        folder.chmod(0o755)
    assert "cannot write the engine" in capsys.readouterr().err


def test_unknown_extension_and_low_opset_are_refused(tmp_path, capsys):
    assert export_main([str(TINY), "--out", str(tmp_path / "x.bin")]) == 2
    assert "unknown engine kind '.bin'" in capsys.readouterr().err
    assert export_main([str(TINY), "--out", str(tmp_path / "x.onnx"), "--opset", "16"]) == 2


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit) as exc:
        export_main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for option in ("--precision", "--min-cos", "--max-abs", "--calib-max-batch", "--no-optimize", "--int8-weights",
                   "--max-batch", "--opt-batch", "--opt-seq", "--timing-cache", ".plan", "PATH.onnx"):
        assert option in text


# ---- TensorRT -----------------------------------------------------------------------------------------------------


def test_plan_without_tensorrt_says_what_to_install(tmp_path, capsys):
    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed")
    except ImportError:
        pass
    assert export_main([str(TINY), "--out", str(tmp_path / "x.plan"), "--precision", "fp16"]) == 3  # the environment
    err = capsys.readouterr().err
    assert "pip install 'instructor-stack[gpu]'" in err and "an NVIDIA GPU with TensorRT" in err
    assert list(tmp_path.iterdir()) == []


def test_plan_profile_shapes_and_checks():
    profile = Profile(max_batch=32, opt_batch=8, max_seq=512, opt_seq=128)
    assert profile.shapes("input_ids") == ((1, 1), (8, 128), (32, 512))
    assert profile.shapes("instruction_count") == ((1,), (8,), (32,))
    with pytest.raises(ValueError, match="--opt-batch"):
        Profile(max_batch=4, opt_batch=8, max_seq=512, opt_seq=128).check()
    with pytest.raises(ValueError, match="--opt-seq"):
        Profile(max_batch=4, opt_batch=2, max_seq=512, opt_seq=1024).check()


def _cuda_tensorrt_or_skip() -> None:
    pytest.importorskip("tensorrt", reason="TensorRT is not installed")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_plan_of_tiny_passes_gate_on_gpu(tmp_path, precision):
    _cuda_tensorrt_or_skip()
    out = tmp_path / f"tiny-{precision}.plan"
    opts = ExportOptions(precision=precision, max_batch=8, timing_cache=tmp_path / "timing.cache")
    manifest = export_bundle(TINY, out, opts)
    assert manifest["parity"]["passed"] and source_onnx_path(out).is_file() and (tmp_path / "timing.cache").is_file()
    assert {"version", "compute_capability", "device_name"} <= set(manifest["tensorrt"])


def test_parity_report_decides_on_the_gate_and_keeps_the_manifest_fields():
    ref = np.eye(3, dtype=np.float32)
    cand = ref.copy()
    cand[2] = [0.0, 0.6, 0.8]  # cosine 0.8 with its reference row
    cand[1, 1] = np.nan
    parity = compare(ref, cand)
    gate = {"min_cos": 0.99}
    report = ParityReport(parity, "pytorch fp32 (cpu)", "onnxruntime", 16, gate, tuple(check_gate(parity, gate)))
    assert not report.passed and report.min_cos == -1.0  # a NaN row counts as cosine -1
    assert report.failures == ("1 rows are NaN/inf", "min cosine -1.000000 < 0.99")
    fields = report.as_dict()
    assert fields["passed"] is False and fields["failures"] == list(report.failures)
    assert set(fields) == {"rows", "min_cosine", "mean_cosine", "max_abs_diff", "nonfinite_rows", "reference", "runner", "batch_size", "gate", "passed", "failures"}
    json.dumps(fields)  # the manifest is JSON
    clean = compare(ref, ref)
    assert ParityReport(clean, "r", "e", 1, gate, tuple(check_gate(clean, gate))).passed
