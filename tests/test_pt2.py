""".pt2 engines (torch.export + AOTInductor) on the CPU: golden vectors of InstructorEmbedding 1.0.1, the CLI with
resumption after SIGKILL, refusal of a package built elsewhere, and the fp32 islands of fp16/bf16 (the rule shared
with the ONNX pass). One AOTInductor compile per session (``tiny_pt2``); the mixed-precision checks run the exported
program without compiling it. GPU tests skip without CUDA."""

from __future__ import annotations

import json
import random
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from export.build import ExportOptions, export_bundle
from export.parity import calibration_inputs, check_gate, compare
from export.pt2 import export_program
from runtime import Encoder, EngineError
from runtime import encode as encode_cli
from runtime.bundle import manifest_path, tokenizer_path
from runtime.manifest_schema import seal
from tests.conftest import TINY
from tests.test_runtime_resume import command, corpus, resumed_rows, run, run_until_paused_then_kill  # noqa: F401

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU visible to torch")


@pytest.fixture(scope="session")
def tiny_pt2(tmp_path_factory) -> Path:
    """The tiny fixture compiled once per session to an fp32 .pt2 for the CPU (about a minute on two cores)."""
    engine = tmp_path_factory.getbasetemp() / "tiny-pt2" / "tiny.pt2"
    if not manifest_path(engine).is_file():
        export_bundle(TINY, engine, ExportOptions(device="cpu"))
    return engine


@pytest.mark.parametrize("batch_size", [1, 7, 32])
def test_golden_vectors_at_every_batch_size(tiny_pt2, golden_inputs, golden_vectors, batch_size):
    order = list(range(len(golden_inputs)))
    random.Random(batch_size).shuffle(order)
    with Encoder(tiny_pt2, device="cpu") as enc:
        out = enc.encode([golden_inputs[i] for i in order], batch_size=batch_size)
        assert enc.backend.name.startswith("torch-aoti:") and enc.device == "cpu"
    restored = np.empty_like(out)
    restored[order] = out
    assert restored.dtype == np.float32 and np.abs(restored - golden_vectors).max() <= 1e-5


def test_manifest_records_build_target_and_parity(tiny_pt2):
    manifest = json.loads(manifest_path(tiny_pt2).read_text())
    assert manifest["engine"]["kind"] == "pt2" and manifest["precision"] == "fp32"
    pt2 = manifest["pt2"]
    assert pt2["format"] == "aoti" and pt2["torch"] == torch.__version__ and pt2["device"] == "cpu"
    assert pt2["max_batch"] >= 32 and pt2["compile_seconds"] > 0
    assert manifest["parity"]["passed"] and manifest["parity"]["max_abs_diff"] <= 1e-5
    assert "torch-aoti" in manifest["parity"]["runner"]


def copy_bundle(engine: Path, folder: Path, **pt2_fields: object) -> Path:
    """The bundle copied to ``folder`` with its manifest's ``pt2`` fields changed as if built elsewhere (and sealed
    again, as that export would have: an edit alone is refused by the seal)."""
    folder.mkdir()
    dst = folder / engine.name
    for src, name in ((engine, dst), (tokenizer_path(engine), tokenizer_path(dst))):
        shutil.copyfile(src, name)
    manifest = json.loads(manifest_path(engine).read_text())
    manifest["pt2"].update(pt2_fields)
    manifest_path(dst).write_text(json.dumps(seal(manifest)))
    return dst


FOREIGN_TORCH = "1.13.1+cu117"  # no torch this project or the GPU image (2.11.0+cu130) runs


def test_package_built_elsewhere_is_refused(tiny_pt2, tmp_path, capsys):
    assert FOREIGN_TORCH != torch.__version__
    other_torch = copy_bundle(tiny_pt2, tmp_path / "torch", torch=FOREIGN_TORCH)
    with pytest.raises(EngineError, match=r"built with torch 1\.13\.1\+cu117 on cpu, this is torch .* re-export it here"):
        Encoder(other_torch)
    other_device = copy_bundle(tiny_pt2, tmp_path / "device", device="cuda", compute_capability="9.0")
    with pytest.raises(EngineError, match=r"on cuda \(compute capability 9\.0\), this is torch .* on cpu"):
        Encoder(other_device, device="cpu")
    docs = tmp_path / "docs.txt"
    docs.write_text("one\ntwo\n", encoding="utf-8")
    rc = encode_cli.main(["--engine", str(other_torch), "--input", str(docs), "--output", str(tmp_path / "o.npy"), "--quiet"])
    assert rc == 2 and "a .pt2 runs only where it was built" in capsys.readouterr().err


def test_export_for_cuda_without_a_gpu_is_refused_before_work(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    from export.__main__ import main as export_main

    assert export_main([str(TINY), "--out", str(tmp_path / "x.pt2"), "--device", "cuda"]) == 3  # no GPU: the environment
    assert "sees no usable CUDA GPU" in capsys.readouterr().err and list(tmp_path.iterdir()) == []


def test_cli_resumes_after_sigkill_byte_identical(tiny_pt2, corpus, tmp_path):  # noqa: F811
    ref = tmp_path / "ref.npy"
    done = run(command(tiny_pt2, corpus, ref))
    assert done.returncode == 0, done.stderr
    out = tmp_path / "out.npy"
    cmd = command(tiny_pt2, corpus, out)
    assert run_until_paused_then_kill(cmd, "commit:3") == -signal.SIGKILL
    assert run(cmd, hook="kill@publish").returncode == -signal.SIGKILL
    assert not out.exists()
    final = run(cmd)
    assert final.returncode == 0, final.stderr
    assert out.read_bytes() == ref.read_bytes() and resumed_rows(out) > 0
    summary = json.loads(Path(f"{out}.summary.json").read_text())
    assert summary["backend"].startswith("torch-aoti:")


# ---- compile example, CUDA-graph buckets -----------------------------------------------------------------------


def test_compile_example_is_a_served_size_with_every_branch(tiny_model):
    from export.pt2 import EXAMPLE_ROWS, EXAMPLE_TOKENS, compile_example

    ids, mask, count = compile_example(tiny_model)
    assert tuple(ids.shape) == (EXAMPLE_ROWS, EXAMPLE_TOKENS) == (32, 128)  # not a 2-row, 12-token toy batch
    assert int(mask.sum(1).max()) == EXAMPLE_TOKENS  # the longest row fills the width
    assert (count > 0).any() and (count == 0).any() and len(set(mask.sum(1).tolist())) > 4


@pytest.mark.parametrize(("rows", "length", "bucket"), [(1, 1, (1, 16)), (1, 17, (1, 32)), (3, 32, (4, 32)), (8, 129, (8, 256)), (5, 500, (8, 512))])
def test_graph_bucket(rows, length, bucket):
    from runtime.backends.pt2 import graph_bucket

    assert graph_bucket(rows, length, 512) == bucket


def test_graph_bucket_caps_at_the_engine_window():
    from runtime.backends.pt2 import graph_bucket

    assert graph_bucket(2, 90, 100) == (2, 100)
    with pytest.raises(ValueError, match="no graph bucket"):
        graph_bucket(1, 101, 100)


def test_padding_to_a_bucket_leaves_the_vectors_unchanged(tiny_pt2, golden_inputs):
    """What a CUDA graph replays (the batch padded to its bucket) gives the real rows' vectors: checked on the CPU
    package, which runs the same graph code."""
    from runtime.backends.pt2 import graph_bucket, pad_to_bucket
    from runtime.bundle import INPUT_NAMES

    with Encoder(tiny_pt2, device="cpu") as enc:
        feeds = enc.tokenizer(golden_inputs[:3])
        arrays = [feeds[name] for name in INPUT_NAMES]
        plain = enc.backend.run(feeds)
        padded = pad_to_bucket(arrays, *graph_bucket(3, arrays[0].shape[1], enc.manifest.max_seq_length))
        assert padded[0].shape[0] == 4 and padded[0].shape[1] >= arrays[0].shape[1]
        out = enc.backend.run(dict(zip(INPUT_NAMES, padded)))
    assert np.isfinite(out).all()  # the padding row too
    assert np.abs(out[:3] - plain).max() <= 1e-5


def test_cuda_graphs_need_cuda(tiny_pt2):
    with pytest.raises(ValueError, match="cuda_graphs needs a CUDA device"):
        Encoder(tiny_pt2, device="cpu", cuda_graphs=True)
    with pytest.raises(ValueError, match=r"\['intra_op_threads'\] apply to ONNX Runtime engines only"):
        Encoder(tiny_pt2, device="cpu", intra_op_threads=1)


# ---- fp16 / bf16: the exported program before compiling -------------------------------------------------------


def program_vectors(program: torch.export.ExportedProgram, model, inputs: list) -> np.ndarray:
    module = program.module()
    out = []
    with torch.no_grad():
        for i in range(0, len(inputs), 16):
            feats = model.tokenizer(inputs[i : i + 16])
            out.append(module(*(torch.from_numpy(feats[k]) for k in ("input_ids", "attention_mask", "instruction_count"))))
    return torch.cat(out).float().numpy()


def node_dtypes(program: torch.export.ExportedProgram, op: str) -> dict[str, torch.dtype]:
    """Module path -> output dtype of every ``op`` node of the program's graph."""
    out = {}
    for node in program.graph.nodes:
        if node.op == "call_function" and getattr(node.target, "__name__", "").split(".")[0] == op:
            stack = node.meta.get("nn_module_stack") or {}
            out[list(stack.values())[-1][0] if stack else node.name] = node.meta["val"].dtype
    return out


@pytest.mark.parametrize(("precision", "low"), [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_fp32_islands_in_the_exported_program(tiny_model, precision, low):
    program, info = export_program(tiny_model, "cpu", precision)
    linears = node_dtypes(program, "linear")
    block = "auto_model.encoder.block.0.layer."
    for name in ("0.SelfAttention.q", "0.SelfAttention.k", "0.SelfAttention.v", "0.SelfAttention.o", "1.DenseReluDense.wi"):
        assert linears[block + name] == low, name
    assert linears[block + "1.DenseReluDense.wo"] == torch.float32 and linears["dense"] == torch.float32
    assert set(node_dtypes(program, "scaled_dot_product_attention").values()) == {low}
    for op in ("pow", "mean", "rsqrt", "embedding", "sum", "relu"):
        assert set(node_dtypes(program, op).values()) <= {torch.float32, torch.int64}, op
    assert info["fp32_matmuls"] == [f"auto_model.encoder.block.{i}.layer.1.DenseReluDense.wo" for i in (0, 1)]
    inputs = calibration_inputs(tiny_model.max_seq_length, 2)
    parity = compare(tiny_model.encode(inputs, batch_size=16), program_vectors(program, tiny_model, inputs))
    assert not check_gate(parity, {"min_cos": 0.999}), parity
    assert tiny_model.auto_model.encoder.block[0].layer[0].SelfAttention.q.weight.dtype == torch.float32  # source untouched


def test_onnx_and_pt2_keep_the_same_projections_fp32(tiny_model, tmp_path):
    """One rule (export.precision_rule) decides both graphs: the same projections stay fp32 in each."""
    from export.mixed_precision import convert
    from export.onnx_graph import export_onnx, ff_width

    onnx_info = convert(export_onnx(tiny_model, tmp_path / "fp32.onnx"), tmp_path / "fp16.onnx", "fp16", ff_width(tiny_model.auto_model.config))
    _, torch_info = export_program(tiny_model, "cpu", "fp16")
    onnx_names = [n.removesuffix("/MatMul").strip("/").replace("/", ".") for n in onnx_info["fp32_matmuls"]]
    assert onnx_names == torch_info["fp32_matmuls"] and onnx_info["fp32_islands"] == torch_info["fp32_islands"]


def test_overflow_fixture_needs_the_islands(tmp_path):
    """FF outputs beyond 65504: the fp16 program with fp32 islands passes the gate, the naive all-fp16 model does not."""
    from bench.shapes import make_overflow_checkpoint
    from trainer.model import InstructorModel

    model = InstructorModel.from_pretrained(make_overflow_checkpoint(tmp_path / "overflow"))
    inputs = calibration_inputs(model.max_seq_length, 2)
    reference = model.encode(inputs, batch_size=16)
    program, _ = export_program(model, "cpu", "fp16")
    assert not check_gate(compare(reference, program_vectors(program, model, inputs)), {"min_cos": 0.999})
    naive = InstructorModel.from_pretrained(tmp_path / "overflow").half()
    assert check_gate(compare(reference, naive.encode(inputs, batch_size=16)), {"min_cos": 0.999})


# ---- GPU -------------------------------------------------------------------------------------------------------


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cuda_pt2_of_tiny_matches_golden(tmp_path, golden_inputs, golden_vectors, precision):
    manifest = export_bundle(TINY, tmp_path / f"tiny-{precision}.pt2", ExportOptions(precision=precision, device="cuda"))
    assert manifest["pt2"]["device"] == "cuda" and manifest["pt2"]["compute_capability"]
    with Encoder(tmp_path / f"tiny-{precision}.pt2", device="cuda") as enc:
        out = enc.encode(golden_inputs, batch_size=7)
        assert enc.max_tokens > 16384  # GPU-sized default budget
    parity = compare(golden_vectors, out)
    gate = {"max_abs": 1e-5} if precision == "fp32" else {"min_cos": 0.999}
    assert not check_gate(parity, gate), parity


@cuda
@pytest.mark.gpu
def test_cuda_graphs_replay_matches_the_plain_call(tmp_path, golden_inputs, golden_vectors):
    export_bundle(TINY, tmp_path / "tiny-bf16.pt2", ExportOptions(precision="bf16", device="cuda"))
    with Encoder(tmp_path / "tiny-bf16.pt2", device="cuda") as plain, Encoder(tmp_path / "tiny-bf16.pt2", device="cuda", cuda_graphs=True) as graphs:
        a = plain.encode(golden_inputs[:16], batch_size=1)
        b = graphs.encode(golden_inputs[:16], batch_size=1)
        b3 = graphs.encode(golden_inputs[:16], batch_size=3)
        stats = graphs.backend.graph_stats()
    assert stats["error"] is None and stats["replays"] > 0 and stats["buckets"], stats
    assert not check_gate(compare(a, b), {"min_cos": 0.9999}) and not check_gate(compare(a, b3), {"min_cos": 0.9999})
    assert not check_gate(compare(golden_vectors[:16], b), {"min_cos": 0.999})
