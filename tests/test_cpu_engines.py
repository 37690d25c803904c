"""CPU engines of an ``auto`` bundle: which one runs (``runtime.cpu_engines``), the OpenVINO backend, the export.

The choice logic is tested on the tiny fp32 bundle with an ``auto`` manifest written here (engines that are never
opened need no files); the OpenVINO tests export the tiny fixture with ``--precision auto`` and skip cleanly where
openvino is not installed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from export.openvino import INT8_LADDER
from runtime import cpu_engines
from runtime.bundle import EngineError, Manifest, load_manifest

TINY = Path(__file__).parent / "fixtures" / "instructor-tiny"


def _entry(name: str, backend: str, precision: str, file: str | None, **extra) -> dict:
    return {"name": name, "backend": backend, "precision": precision, "file": file, "sha256": "0" * 64,
            "gate": {"min_cos": 0.99}, "passed": file is not None, **extra}


@pytest.fixture()
def auto_manifest(tiny_engine, tmp_path):
    """A copy of the tiny fp32 bundle whose manifest lists four CPU engines (only the first has a file)."""
    folder = tmp_path / "bundle"
    folder.mkdir()
    for path in tiny_engine.parent.glob(f"{tiny_engine.name}*"):
        shutil.copy(path, folder / path.name)
    engine = folder / tiny_engine.name
    data = load_manifest(engine).data
    name = engine.name
    data[cpu_engines.FIELD] = {
        "candidates": [
            _entry("onnxruntime-fp32", "onnxruntime", "fp32", name),
            _entry("onnxruntime-int8", "onnxruntime", "int8", f"{name}.cpu.int8.onnx"),
            _entry("openvino-bf16", "openvino", "bf16", f"{name}.cpu.openvino.xml", inference_precision="bf16"),
            _entry("openvino-int8", "openvino", "int8", None, reason="parity gate: min cosine 0.95 < 0.99"),
        ],
        "reference": {"file": f"{name}.cpu.reference.npz", "sha256": "0" * 64, "rows": 2},
        "measured": [],
    }
    return Manifest(engine=engine, data=data)


@pytest.fixture()
def everything_runs(monkeypatch):
    """As on a CPU with native bf16 and OpenVINO installed, whatever this machine has."""
    monkeypatch.setattr(cpu_engines, "openvino_installed", lambda: True)
    monkeypatch.setattr(cpu_engines, "native_bf16", lambda: True)


def _never(_cands):
    raise AssertionError("measured although a race for this CPU was already known")


def test_a_bundle_of_one_engine_runs_that_engine(tiny_engine):
    from runtime import Encoder

    with Encoder(tiny_engine) as enc:
        assert enc.engine_choice.name == "onnx-fp32"
        assert enc.engine_choice.how == "the bundle's only engine"
    with pytest.raises(EngineError, match="holds one fp32 engine"):
        Encoder(tiny_engine, precision="int8")


def test_the_exporters_race_on_this_cpu_decides_without_measuring(auto_manifest, everything_runs):
    auto_manifest.data[cpu_engines.FIELD]["measured"] = [
        {"cpu": cpu_engines.cpu_signature(), "threads": cpu_engines.effective_threads(0),
         "seconds": {"onnxruntime-fp32": 3.0, "onnxruntime-int8": 2.0, "openvino-bf16": 1.0},
         "length_multiple": {"onnxruntime-fp32": 1, "onnxruntime-int8": 1, "openvino-bf16": 16}},
        {"cpu": {"cpu": "another CPU", "flags": []}, "threads": 2, "seconds": {"onnxruntime-fp32": 0.1}},
    ]
    choice = cpu_engines.choose(auto_manifest, "auto", "cpu", 0, measure=_never)
    assert (choice.name, choice.backend, choice.precision) == ("openvino-bf16", "openvino", "bf16")
    assert choice.length_multiple == 16 and choice.as_dict()["length_multiple"] == 16  # the CLI summary and /info say it
    assert "export's race on this CPU" in choice.how
    assert choice.skipped == {"openvino-int8": "not kept at export: parity gate: min cosine 0.95 < 0.99"}
    # a precision narrows the race: the fastest engine of that precision
    assert cpu_engines.choose(auto_manifest, "int8", "cpu", 0, measure=_never).name == "onnxruntime-int8"
    fp32 = cpu_engines.choose(auto_manifest, "onnxruntime-fp32", "cpu", 0, measure=_never)
    assert fp32.name == "onnxruntime-fp32" and fp32.length_multiple == 1 and "length_multiple" not in fp32.as_dict()
    del auto_manifest.data[cpu_engines.FIELD]["measured"][0]["length_multiple"]  # a bundle raced before multiples were
    assert cpu_engines.choose(auto_manifest, "auto", "cpu", 0, measure=_never).length_multiple == 1


def test_another_cpu_is_measured_once_then_cached(auto_manifest, everything_runs):
    calls = []

    def measure(cands):
        calls.append(sorted(c.name for c in cands))
        return {"onnxruntime-fp32": 2.0, "onnxruntime-int8": 1.5, "openvino-bf16": 0.5}, {
            "openvino-bf16": "failed its gate on this CPU against the reference vectors: min cosine 0.9 < 0.999"}, {}

    auto_manifest.data[cpu_engines.FIELD]["measured"] = [
        {"cpu": {"cpu": "another CPU", "flags": ["avx2"]}, "threads": cpu_engines.effective_threads(0),
         "seconds": {"openvino-bf16": 0.1}}]
    first = cpu_engines.choose(auto_manifest, "auto", "cpu", 0, measure=measure)
    assert calls == [["onnxruntime-fp32", "onnxruntime-int8", "openvino-bf16"]]
    # the fastest that failed its gate here is not run: the next fastest is, and the reason is kept
    assert first.name == "onnxruntime-int8" and "measured here" in first.how
    assert "failed its gate on this CPU" in first.skipped["openvino-bf16"]
    again = cpu_engines.choose(auto_manifest, "auto", "cpu", 0, measure=_never)
    assert again.name == "onnxruntime-int8" and "cached" in again.how
    # another thread count is another race
    third = cpu_engines.choose(auto_manifest, "auto", "cpu", 1, measure=measure)
    assert len(calls) == 2 and third.name == "onnxruntime-int8"


def test_engines_that_cannot_run_here_are_named_with_the_reason(auto_manifest, monkeypatch):
    monkeypatch.setattr(cpu_engines, "openvino_installed", lambda: False)
    choice = cpu_engines.choose(auto_manifest, "auto", "cpu", 0, measure=lambda cs: ({"onnxruntime-fp32": 2.0, "onnxruntime-int8": 1.0}, {}, {}))
    assert choice.name == "onnxruntime-int8"
    assert "pip install 'instructor-stack[openvino]'" in choice.skipped["openvino-bf16"]
    monkeypatch.setattr(cpu_engines, "openvino_installed", lambda: True)
    monkeypatch.setattr(cpu_engines, "native_bf16", lambda: False)
    with pytest.raises(EngineError, match="no native bf16"):
        cpu_engines.choose(auto_manifest, "bf16", "cpu", 0, measure=_never)


def test_a_gpu_runs_the_onnx_engine(auto_manifest, everything_runs):
    choice = cpu_engines.choose(auto_manifest, "auto", "cuda", 0, measure=_never)
    assert choice.name == "onnxruntime-fp32" and "GPU" in choice.how
    with pytest.raises(EngineError, match="on a GPU"):
        cpu_engines.choose(auto_manifest, "bf16", "cuda", 0, measure=_never)


@pytest.mark.parametrize("bad", ["../elsewhere.onnx", "other.onnx.cpu.int8.onnx", "sub/dir.xml"])
def test_a_file_outside_the_bundle_is_refused(auto_manifest, bad):
    auto_manifest.data[cpu_engines.FIELD]["candidates"][1]["file"] = bad
    with pytest.raises(EngineError, match=r"cpu_engines.candidates\[1\].file"):
        cpu_engines.candidates(auto_manifest)


def test_unknown_precision_names_the_choices(auto_manifest):
    with pytest.raises(ValueError, match="choose from auto, fp32, bf16, int8"):
        cpu_engines.choose(auto_manifest, "fp8", "cpu", 0)


def test_gate_failures_follow_the_exporters_rule():
    ref = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]], dtype=np.float32)
    same = ref.copy()
    assert cpu_engines.gate_failures(ref, same, {"min_cos": 0.999, "max_abs": 1e-5}) == []  # a zero row equals zero
    off = np.array([[1.0, 0.1], [0.0, 1.0], [0.0, 0.0]], dtype=np.float32)
    failures = cpu_engines.gate_failures(ref, off, {"min_cos": 0.999, "max_abs": 1e-5})
    assert failures[0].startswith("min cosine 0.995") and failures[1].startswith("max abs diff 0.1")
    nan = same.copy()
    nan[1, 0] = np.nan
    assert cpu_engines.gate_failures(ref, nan, {"min_cos": 0.0})[0].startswith("min cosine -1")


def test_the_race_keeps_each_engines_faster_width_rule(monkeypatch):
    """Two engines on a clock that each run advances by its cost: one computes a width of 16 faster than 15 (as
    AMX tiles do), the other pays per position. Each keeps the rule that is faster for it; no real time is read."""
    clock = [0.0]
    monkeypatch.setattr(cpu_engines.time, "perf_counter", lambda: clock[0])

    class Costed:
        def __init__(self, cost):
            self.cost, self.widths = cost, []

        def run(self, feeds):
            width = feeds["input_ids"].shape[1]
            self.widths.append(width)
            clock[0] += self.cost(width)
            return np.zeros((len(feeds["input_ids"]), 2), dtype=np.float32)

    tiled = Costed(lambda w: 1.0 if w % 16 == 0 else 2.0)
    linear = Costed(lambda w: float(w))
    feeds = [{"input_ids": np.ones((2, 15), np.int64), "attention_mask": np.ones((2, 15), np.int64)},
             {"input_ids": np.ones((2, 40), np.int64), "attention_mask": np.ones((2, 40), np.int64)}]
    timed = cpu_engines.race({"tiled": tiled, "linear": linear}, feeds, pad_id=0, max_seq_length=512)
    assert timed == {"tiled": {1: 4.0, 16: 2.0}, "linear": {1: 55.0, 16: 64.0}}
    assert cpu_engines.fastest_rules(timed) == ({"tiled": 2.0, "linear": 55.0}, {"tiled": 16, "linear": 1})
    assert cpu_engines.fastest_rules({"tie": {1: 3.0, 16: 3.0}})[1] == {"tie": 1}
    assert set(tiled.widths) == {15, 16, 40, 48}  # both rules ran, each once untimed and RACE_ROUNDS times timed
    assert len(tiled.widths) == 2 * len(feeds) * (cpu_engines.RACE_ROUNDS + 1)


def test_run_each_uses_run_many_where_the_backend_has_it():
    calls = []

    class One:
        def run(self, feeds):
            calls.append(feeds["i"])
            return np.full((1, 2), feeds["i"], dtype=np.float32)

    class Many(One):
        def run_many(self, batches):
            calls.append("many")
            return (self.run(b) for b in batches)

    batches = [{"i": 1}, {"i": 2}]
    lazy = cpu_engines.run_each(One(), batches)
    assert calls == []  # nothing runs before the caller asks
    assert [int(v[0, 0]) for v in lazy] == [1, 2]
    calls.clear()
    assert [int(v[0, 0]) for v in cpu_engines.run_each(Many(), batches)] == [1, 2] and calls[0] == "many"


# -- OpenVINO: a real auto bundle of the tiny fixture ------------------------------------------------------------


@pytest.fixture(scope="module")
def auto_bundle(tmp_path_factory):
    pytest.importorskip("openvino")
    from export.build import ExportOptions, export_bundle
    from export.progress import Progress

    out = tmp_path_factory.mktemp("auto") / "tiny.onnx"
    engines = ("onnxruntime-fp32", "openvino-f32", "openvino-bf16")
    export_bundle(TINY, out, ExportOptions(precision="auto", engines=engines, calib_max_batch=1, progress=Progress(False)))
    return out


def test_auto_export_writes_each_kept_engine_with_its_gate(auto_bundle):
    data = load_manifest(auto_bundle).data
    assert data["precision"] == "fp32"  # NAME.onnx itself: the ONNX Runtime fp32 engine
    field = data[cpu_engines.FIELD]
    by_name = {c["name"]: c for c in field["candidates"]}
    assert by_name["onnxruntime-fp32"]["file"] == auto_bundle.name
    assert by_name["openvino-f32"]["passed"] and by_name["openvino-f32"]["parity"]["max_abs_diff"] <= 1e-5
    for c in field["candidates"]:
        if c["passed"]:
            assert (auto_bundle.parent / c["file"]).is_file()
        else:
            assert c["reason"]  # e.g. no native bf16 on this CPU
    # the gate covered the held-out rows too: more rows than the calibration set
    assert field["reference"]["rows"] == by_name["openvino-f32"]["parity"]["rows"] > 64 + 14 + 1
    race = field["measured"][0]
    assert race["cpu"] == cpu_engines.cpu_signature() and race["picked"] == min(race["seconds"], key=race["seconds"].get)
    assert set(race["length_multiple"]) == set(race["seconds"]) and set(race["length_multiple"].values()) <= set(cpu_engines.LENGTH_MULTIPLES)
    for name, m in race["length_multiple"].items():  # each engine's time is that of its rule, and no other rule was faster
        by_rule = race["seconds_by_multiple"][name]
        assert race["seconds"][name] == by_rule[str(m)] == min(by_rule.values())


def test_auto_bundle_runs_the_races_winner_and_each_engine_matches(auto_bundle, golden_inputs, golden_vectors):
    from export.parity import compare
    from runtime import Encoder

    field = load_manifest(auto_bundle).data[cpu_engines.FIELD]
    with Encoder(auto_bundle) as enc:
        assert enc.engine_choice.name == field["measured"][0]["picked"]
        assert "export's race on this CPU" in enc.engine_choice.how
    for c in field["candidates"]:
        if not c["passed"]:
            continue
        with Encoder(auto_bundle, precision=c["name"]) as enc:
            got = enc.encode(golden_inputs, batch_size=7)
        parity = compare(golden_vectors, got)  # rows pooled to zero on both sides count as equal
        if c["precision"] == "fp32":
            assert parity.max_abs <= 1e-5, c["name"]
        else:
            assert parity.min_cos >= 0.999, c["name"]


def test_openvino_compiles_one_stream_of_every_thread_by_default():
    """LATENCY by default (faster on an idle CPU, measured in the backend's doc); streams only when asked."""
    from runtime.backends.openvino import OpenVinoOptions, compile_config

    assert compile_config(OpenVinoOptions("bf16", threads=2)) == {
        "INFERENCE_PRECISION_HINT": "bf16", "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": "2"}
    assert compile_config(OpenVinoOptions("f32", streams=2))["NUM_STREAMS"] == "2"
    assert compile_config(OpenVinoOptions("f32", streams=0))["PERFORMANCE_HINT"] == "THROUGHPUT"


def test_openvino_run_many_keeps_the_order_of_run(auto_bundle, golden_inputs):
    from runtime.backends.openvino import OpenVinoBackend, OpenVinoOptions

    tok = load_manifest(auto_bundle).tokenizer()
    batches = [tok(golden_inputs[i : i + 5]) for i in range(0, 40, 5)]
    backend = OpenVinoBackend(auto_bundle.parent / f"{auto_bundle.name}.cpu.openvino.xml", OpenVinoOptions("f32", streams=2))
    assert backend.streams == 2
    one_by_one = [backend.run(b) for b in batches]
    many = list(backend.run_many(batches))
    assert len(many) == len(batches)
    for a, b in zip(one_by_one, many):
        np.testing.assert_array_equal(a, b)


def test_another_cpu_measures_here_and_caches(auto_bundle, monkeypatch, capsys):
    from runtime import Encoder

    monkeypatch.setattr(cpu_engines, "cpu_signature", lambda: {"cpu": "a CPU the exporter never saw", "flags": ["avx2"]})
    with Encoder(auto_bundle) as enc:
        first = enc.engine_choice
    assert "measured here" in first.how and set(first.seconds) <= {"onnxruntime-fp32", "openvino-f32", "openvino-bf16"}
    assert "measuring" in capsys.readouterr().err
    with Encoder(auto_bundle) as enc:
        assert enc.engine_choice.name == first.name and "cached" in enc.engine_choice.how


def test_one_engine_asked_for_on_another_cpu_is_still_gated_there(auto_bundle, monkeypatch):
    """Asking for one engine by name leaves nothing to race, but on a CPU the export never saw its kernels round
    differently: it is checked against the bundle's reference vectors before it runs, and refused if it fails."""
    from runtime import Encoder

    monkeypatch.setattr(cpu_engines, "cpu_signature", lambda: {"cpu": "a CPU the exporter never saw", "flags": ["avx2"]})
    monkeypatch.setattr(cpu_engines, "cache_dir", lambda: auto_bundle.parent / "no-cache")
    with Encoder(auto_bundle, precision="openvino-f32") as enc:
        assert enc.engine_choice.name == "openvino-f32" and "measured here" in enc.engine_choice.how
    real = cpu_engines.reference
    monkeypatch.setattr(cpu_engines, "reference", lambda m: (real(m)[0], -real(m)[1]))  # vectors it cannot match
    monkeypatch.setattr(cpu_engines, "cache_dir", lambda: auto_bundle.parent / "no-cache-2")
    with pytest.raises(EngineError, match="openvino-f32"):
        Encoder(auto_bundle, precision="openvino-f32")


def test_a_replaced_engine_file_is_refused(auto_bundle, tmp_path):
    from runtime import Encoder

    folder = tmp_path / "copy"
    shutil.copytree(auto_bundle.parent, folder)
    xml = folder / f"{auto_bundle.name}.cpu.openvino.xml"
    xml.write_text(xml.read_text().replace("<net ", "<net  ", 1))
    with pytest.raises(EngineError, match="sha256"):
        Encoder(folder / auto_bundle.name, precision="openvino-f32")


def test_auto_export_refuses_a_plan_and_unknown_engines(tmp_path):
    from export.build import ExportError, ExportOptions, export_bundle

    with pytest.raises(ExportError, match="use --out NAME.onnx"):
        export_bundle(TINY, tmp_path / "x.plan", ExportOptions(precision="auto"))
    with pytest.raises(ValueError, match="unknown CPU engine 'openvino-fp8'"):
        export_bundle(TINY, tmp_path / "x.onnx", ExportOptions(precision="auto", engines=("openvino-fp8",)))


def test_cli_runs_the_asked_engine_and_says_which(auto_bundle, tmp_path, capsys):
    from runtime import encode

    src = tmp_path / "d.txt"
    src.write_text("a short text\nanother one, a little longer\n", encoding="utf-8")
    rc = encode.main(["--engine", str(auto_bundle), "--input", str(src), "--output", str(tmp_path / "o.npy"),
                      "--precision", "openvino-f32", "--quiet"])
    assert rc == 0
    summary = json.loads(Path(f"{tmp_path / 'o.npy'}.summary.json").read_text())
    assert summary["engine_choice"]["engine"] == "openvino-f32" and summary["backend"].startswith("openvino:CPU")
    assert summary["precision"] == "fp32"
    rc = encode.main(["--engine", str(auto_bundle), "--input", str(src), "--output", str(tmp_path / "p.npy"),
                      "--precision", "fp8", "--quiet"])
    assert rc == 2 and "choose from auto, fp32, bf16, int8" in capsys.readouterr().err


def test_server_info_says_which_engine_serves(auto_bundle):
    import httpx

    from runtime.serve.app import create_app
    from runtime.serve.config import ServeConfig
    from tests.serve_support import live_server

    app = create_app(ServeConfig(engine=auto_bundle, precision="openvino-f32", replicas=1))
    with live_server(app) as url:
        info = httpx.get(f"{url}/info", timeout=30).json()
    assert info["engine_choice"]["engine"] == "openvino-f32" and info["precision"] == "fp32"
    assert info["backend"].startswith("openvino:CPU") and info["engines"][0]["engine"] == "openvino-f32"


def _fed_by_fake_quantize(port) -> bool:
    """Whether an input reaches its op through a FakeQuantize (looking through layout-only ops)."""
    node = port.get_source_output().get_node()
    while node.get_type_name() in ("Transpose", "Reshape", "Convert"):
        node = node.input_value(0).get_node()
    return node.get_type_name() == "FakeQuantize"


@pytest.mark.parametrize("rung", INT8_LADDER, ids=lambda r: r.label)
def test_each_nncf_int8_rung_keeps_attention_float_and_does_what_it_says(auto_bundle, tmp_path, rung):
    """The ladder's recipes as built: attention and the pooled projection never quantized, the named FF MatMuls
    float, SmoothQuant as said."""
    pytest.importorskip("nncf")
    import openvino as ov

    from transformers import AutoConfig

    from export import openvino as eov
    from export.onnx_graph import ff_width
    from runtime.backends.openvino import OpenVinoBackend

    xml = auto_bundle.parent / f"{auto_bundle.name}{cpu_engines.FILE_INFIX}openvino.xml"
    manifest = load_manifest(auto_bundle)
    tok = manifest.tokenizer()
    inputs, vectors = cpu_engines.reference(manifest)  # the export's calibration + held-out rows
    rows = [tok([x]) for x in inputs]
    roles = eov.matmul_roles(xml, ff_width(AutoConfig.from_pretrained(TINY)))
    assert len(roles["pooled"]) == 1 and roles["ff_output"]  # the Dense projection; one FF output per block
    kept_float = rung.float_matmuls(roles)
    info = eov.quantize_int8(xml, tmp_path / "int8.xml", rows, kept_float, smooth_quant=rung.smooth_quant)
    ops = ov.Core().read_model(str(tmp_path / "int8.xml")).get_ops()

    attention = [op for op in ops if op.get_type_name() in eov.ATTENTION_OPS]
    assert attention and not any(_fed_by_fake_quantize(port) for op in attention for port in op.inputs())
    matmuls = {op.get_friendly_name(): op for op in ops if op.get_type_name() == "MatMul"}
    quantized = [name for name, op in matmuls.items() if _fed_by_fake_quantize(op.inputs()[0])]
    assert quantized and not set(quantized) & set(kept_float)
    assert all(name in matmuls and not _fed_by_fake_quantize(matmuls[name].inputs()[0]) for name in kept_float)
    assert not any(_fed_by_fake_quantize(matmuls[name].inputs()[0]) for name in roles["pooled"])  # on every rung
    assert any("smooth_quant" in op.get_friendly_name() for op in ops) == rung.smooth_quant
    assert info["smooth_quant"] == rung.smooth_quant and info["float_op_types"] == list(eov.ATTENTION_OPS)

    # a row that pools to zero (only instruction tokens) stays zero, as in the reference, not a unit vector
    zero = [x for x, v in zip(inputs, vectors) if not v.any()]
    assert zero
    assert not OpenVinoBackend(tmp_path / "int8.xml").run(tok(zero)).any()
