"""Data safety of ``python -m runtime.encode``: one run per output, resume by content, verified engines, bad rows
that stay bad rows, and system errors that end in a message (each case reproduced the failure before its fix)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from runtime import encode
from runtime.bundle import EngineError, load_manifest, verify_engine_file
from runtime.encoder import Encoder
from runtime.job import summary_path
from tests.test_runtime import ROOT

INSTR = "Represent the document for retrieval: "


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


def texts(n: int, tag: str) -> list[str]:
    return [f"{tag} document number {i} about topic {i % 7}" for i in range(n)]


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "runtime.encode", *args, "--quiet"]


def paused(args: list[str], point: str) -> subprocess.Popen:
    """Start the CLI and return once it is paused at ``point`` (holding its lock); the caller kills it."""
    proc = subprocess.Popen([sys.executable, "-m", "tests.encode_hooked", f"pause@{point}", *args, "--quiet"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if line.strip() == f"PAUSED {point}":
            return proc
    raise AssertionError(f"the run ended before {point}: rc {proc.wait()}")


def reference(engine: Path, docs: list[str]) -> np.ndarray:
    with Encoder(engine) as enc:
        return enc.encode(docs)


# -- 1. one run per output ---------------------------------------------------------------------------------------


def test_a_second_run_on_a_busy_output_exits_3_and_takes_nothing_over(tiny_engine, tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", texts(40, "alpha"))
    b = write_jsonl(tmp_path / "b.jsonl", texts(40, "beta"))
    out = tmp_path / "out.npy"
    args_a = ["--engine", str(tiny_engine), "--input", str(a), "--output", str(out), "--shard-rows", "8"]
    first = paused(args_a, "commit:1")
    try:
        for other in (["--input", str(b), "--overwrite"], ["--input", str(a)]):  # B with --overwrite; the same command
            argv = ["--engine", str(tiny_engine), *other, "--output", str(out), "--shard-rows", "8"]
            second = subprocess.run(cli(*argv), cwd=ROOT, capture_output=True, text=True, timeout=120)
            assert second.returncode == encode.EXIT_ENVIRONMENT, second.stderr  # another run is the environment
            assert f"is in use by another run (pid {first.pid}" in second.stderr
            assert "Traceback" not in second.stderr
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
        first.stderr.close()
    done = subprocess.run(cli(*args_a), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(summary_path(out).read_text())["resumed_rows"] == 8  # A's own shard survived B's attempt
    np.testing.assert_allclose(np.load(out), reference(tiny_engine, texts(40, "alpha")), atol=1e-6, rtol=0)
    assert not Path(f"{out}.lock").exists()


# -- 2. resume by content ----------------------------------------------------------------------------------------


def test_an_input_edited_in_place_is_not_resumed_into(tiny_engine, tmp_path):
    src = write_jsonl(tmp_path / "docs.jsonl", texts(40, "alpha"))
    out = tmp_path / "out.npy"
    args = ["--engine", str(tiny_engine), "--input", str(src), "--output", str(out), "--shard-rows", "8"]
    killed = subprocess.run([sys.executable, "-m", "tests.encode_hooked", "kill@commit:2", *args, "--quiet"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL
    stat = src.stat()
    data = src.read_bytes()
    src.write_bytes(data.replace(b"alpha document number 3 ", b"ALPHA document number 3 "))  # same size
    os.utime(src, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # and the old mtime
    assert src.stat().st_size == stat.st_size and src.stat().st_mtime_ns == stat.st_mtime_ns
    again = subprocess.run(cli(*args), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2
    assert "lines 1-8 changed since the interrupted run" in again.stderr and "--overwrite" in again.stderr
    assert not out.exists()
    fresh = subprocess.run(cli(*args, "--overwrite"), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert fresh.returncode == 0
    edited = [t.replace("alpha document number 3 ", "ALPHA document number 3 ") for t in texts(40, "alpha")]
    np.testing.assert_allclose(np.load(out), reference(tiny_engine, edited), atol=1e-6, rtol=0)


def test_a_touched_but_unchanged_input_still_resumes(tiny_engine, tmp_path):
    src = write_jsonl(tmp_path / "docs.jsonl", texts(30, "alpha"))
    out = tmp_path / "out.npy"
    args = ["--engine", str(tiny_engine), "--input", str(src), "--output", str(out), "--shard-rows", "8"]
    subprocess.run([sys.executable, "-m", "tests.encode_hooked", "kill@commit:2", *args], cwd=ROOT, timeout=120)
    os.utime(src)  # a new mtime, the same bytes
    assert encode.main([*args, "--quiet"]) == 0
    assert json.loads(summary_path(out).read_text())["resumed_rows"] == 16


# -- 3. engines verified by default -------------------------------------------------------------------------------


def _bundle_copy(engine: Path, folder: Path) -> Path:
    folder.mkdir()
    copy = folder / engine.name
    for suffix in ("", ".manifest.json", ".tokenizer.json"):
        shutil.copyfile(f"{engine}{suffix}", f"{copy}{suffix}")
    return copy


def test_an_engine_corrupted_in_place_is_refused_even_after_a_cached_check(tiny_engine, tmp_path, capsys):
    engine = _bundle_copy(tiny_engine, tmp_path / "bundle")
    sha = load_manifest(engine, verify_engine=False).data["engine"]["sha256"]
    assert verify_engine_file(engine, sha) is True  # first use: hashed
    assert verify_engine_file(engine, sha) is False  # then remembered
    stat = engine.stat()
    with open(engine, "r+b") as fh:  # flip bytes in the middle; size kept, mtime restored
        fh.seek(stat.st_size // 2)
        chunk = fh.read(64)
        fh.seek(stat.st_size // 2)
        fh.write(bytes(255 - b for b in chunk))
    os.utime(engine, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(EngineError, match="sha256 differs from the manifest's"):
        load_manifest(engine)
    src = write_jsonl(tmp_path / "d.jsonl", ["x"])
    rc = encode.main(["--engine", str(engine), "--input", str(src), "--output", str(tmp_path / "o.npy"), "--quiet"])
    assert rc == 2 and "sha256 differs" in capsys.readouterr().err


@pytest.mark.parametrize("field,value,message", [
    ("max_seq_length", "512", "manifest field 'max_seq_length' must be an integer from 1 to"),
    ("embedding_dim", None, "manifest field 'embedding_dim' must be an integer from 1 to"),
    ("engine", [], "manifest field 'engine' must be an object"),
    ("do_lower_case", "no", "manifest field 'do_lower_case' must be true or false"),
    ("vocab_size", 100, "past the model's vocabulary (manifest field 'vocab_size' = 100)"),
    ("max_position_embeddings", 64, "manifest field 'max_seq_length' = 512 is past the model's position table"),
])
def test_an_edited_manifest_is_refused_naming_the_field(tiny_engine, tmp_path, capsys, field, value, message):
    engine = _bundle_copy(tiny_engine, tmp_path / "bundle")
    mpath = Path(f"{engine}.manifest.json")
    manifest = json.loads(mpath.read_text())
    manifest[field] = value
    mpath.write_text(json.dumps(manifest))
    src = write_jsonl(tmp_path / "d.jsonl", ["x"])
    rc = encode.main(["--engine", str(engine), "--input", str(src), "--output", str(tmp_path / "o.npy"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err


def test_exported_manifest_records_the_table_sizes(tiny_engine):
    data = load_manifest(tiny_engine).data
    assert data["vocab_size"] == 32128 and data["max_position_embeddings"] is None  # T5: relative positions


# -- 3b. manifests: every field validated, the whole manifest sealed, the engine's own record compared --------------


def _edited(engine: Path, folder: Path, reseal: bool = False, **fields: object) -> Path:
    """A copy of the bundle with manifest ``fields`` changed (``reseal``: as someone who also recomputes the seal)."""
    from runtime.manifest_schema import seal

    copy = _bundle_copy(engine, folder)
    mpath = Path(f"{copy}.manifest.json")
    data = json.loads(mpath.read_text())
    data.update(fields)
    mpath.write_text(json.dumps(seal(data) if reseal else data))
    return copy


def _encode_cli(engine: Path, tmp_path: Path, *extra: str) -> int:
    src = write_jsonl(tmp_path / "d.jsonl", ["x", "a longer document about yams"])
    return encode.main(["--engine", str(engine), "--input", str(src), "--output", str(tmp_path / "o.npy"), "--quiet", *extra])


EDITS = [  # each changed the vectors, or the shapes the runtime allocates, and loaded with exit 0 before the seal
    ({"max_seq_length": 8}, "changed 'max_seq_length'"),
    ({"max_seq_length": 4096}, "changed 'max_seq_length'"),
    ({"do_lower_case": True}, "changed 'do_lower_case'"),
    ({"precision": "int8"}, "changed 'precision'"),
    ({"normalize": False}, "changed 'normalize'"),
    ({"architecture": "bert"}, "changed 'architecture'"),
    ({"embedding_dim": 16, "outputs": [{"name": "sentence_embedding", "dtype": "float32", "shape": ["batch", 16]}]},
     "changed 'embedding_dim', 'outputs'"),
    ({"parity": {"passed": True}}, "changed 'parity'"),
    ({"note": "added by hand"}, "manifest field 'note' is unknown to this runtime"),
]


@pytest.mark.parametrize("fields,message", EDITS)
def test_a_manifest_edited_after_export_is_refused_naming_the_field(tiny_engine, tmp_path, capsys, fields, message):
    engine = _edited(tiny_engine, tmp_path / "bundle", **fields)
    assert _encode_cli(engine, tmp_path) == 2
    err = capsys.readouterr().err
    assert message in err and f"{engine}.manifest.json" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_no_verify_engine_is_the_explicit_way_to_use_an_edited_setting(tiny_engine, tmp_path):
    engine = _edited(tiny_engine, tmp_path / "bundle", max_seq_length=8)
    with pytest.raises(EngineError, match="changed 'max_seq_length'"):
        Encoder(engine)
    with Encoder(engine, verify_engine=False) as enc:  # the user's explicit choice: texts cut at 8 tokens
        assert enc.max_seq_length == 8 and enc.encode(["x"]).shape == (1, 32)


@pytest.mark.parametrize("fields,message", [
    ({"do_lower_case": True}, "manifest field 'do_lower_case' = true, but the engine itself was exported with false"),
    ({"max_seq_length": 8}, "manifest field 'max_seq_length' = 8, but the engine itself was exported with 512"),
    ({"precision": "int8"}, "manifest field 'precision' = \"int8\", but the engine itself was exported with \"fp32\""),
    ({"architecture": "bert"}, "manifest field 'architecture' = \"bert\", but the engine itself was exported with \"t5\""),
])
def test_a_resealed_edit_is_caught_by_the_record_inside_the_engine(tiny_engine, tmp_path, fields, message):
    engine = _edited(tiny_engine, tmp_path / "bundle", reseal=True, **fields)
    with pytest.raises(EngineError, match=message.replace("(", r"\(")) as exc:
        Encoder(engine)
    assert str(exc.value).startswith(f"{engine}.manifest.json: ")


def test_facts_about_the_graph_are_checked_even_unverified(tiny_engine, tmp_path):
    dim16 = {"embedding_dim": 16, "outputs": [{"name": "sentence_embedding", "dtype": "float32", "shape": ["batch", 16]}]}
    engine = _edited(tiny_engine, tmp_path / "a", **dim16)
    with pytest.raises(EngineError, match="manifest field 'embedding_dim' = 16, the engine's output has 32"):
        Encoder(engine, verify_engine=False)
    engine = _edited(tiny_engine, tmp_path / "b", architecture="bert")
    with pytest.raises(EngineError, match="manifest field 'architecture' = \"bert\", but the engine itself"):
        Encoder(engine, verify_engine=False)
    engine = _edited(tiny_engine, tmp_path / "c", precision="int8")  # the record says the weights are float
    with pytest.raises(EngineError, match=r"'precision' = 'int8' does not fit the graph's weight types \['float', 'int64'\]"):
        Encoder(engine, verify_engine=False)


NEST = 100_000
MALFORMED = [  # (raw manifest text builder, the field or reason named)
    (lambda m: m.replace('"parity": {', '"parity": {"deep": ' + "[" * NEST + "]" * NEST + ", ", 1),
     "corrupt manifest (JSON nested too deeply)"),
    (lambda m: m.replace('"parity": {', '"parity": {"deep": ' + "[" * 40 + "]" * 40 + ", ", 1),
     "manifest field 'parity' must be an object nested at most 16 deep"),
    (lambda m: m.replace('"embedding_dim": 32', '"embedding_dim": 1e12'),
     "manifest field 'embedding_dim' must be an integer from 1 to 65536, got 1000000000000.0"),
    (lambda m: m.replace('"embedding_dim": 32', '"embedding_dim": 1000000000000'),
     "manifest field 'embedding_dim' must be an integer from 1 to 65536, got 1000000000000"),
    (lambda m: m.replace('"embedding_dim": 32', '"embedding_dim": 16'),
     "manifest field 'outputs' gives dimension 32, 'embedding_dim' says 16"),
    (lambda m: m.replace('"embedding_dim": 32', '"embedding_dim": ' + "9" * 5000),
     "corrupt manifest (Exceeds the limit (4300 digits)"),
    (lambda m: m.replace('"precision": "fp32"', '"precision": 5'),
     'manifest field \'precision\' must be one of "fp32", "fp16", "bf16", "int8", got 5'),
    (lambda m: m.replace('"architecture": "t5"', '"architecture": "\\ud800"'),
     "manifest field 'architecture' must be a string of 1 to 64 characters, got \"\\ud800\""),
    (lambda m: m.replace('"kind": "onnx"', '"kind": ["onnx"]'), "manifest field 'engine.kind' must be one of"),
    (lambda m: m.replace('"sha256": "', '"sha256": "zz', 1), "manifest field 'engine.sha256' must be a sha256"),
    (lambda m: m.replace('"normalize": true', '"normalize": "yes"'), "manifest field 'normalize' must be true or false"),
    (lambda m: m.replace('"max_seq_length": 512', '"max_seq_length": 0'), "manifest field 'max_seq_length' must be an integer from 1"),
    (lambda m: m.replace('"format": "instructor-engine/2"', '"format": "instructor-engine/9"'), "manifest field 'format' must be one of"),
    (lambda m: m.replace('"tokenizer": {', '"tokenizer_": {', 1), "manifest field 'tokenizer' is missing"),
    (lambda m: "[1, 2]", "a manifest is a JSON object"),
    (lambda m: m[: len(m) // 2], "corrupt manifest"),
]


@pytest.mark.parametrize("index", range(len(MALFORMED)))
def test_a_malformed_manifest_is_one_line_naming_file_and_field(tiny_engine, tmp_path, capsys, index):
    make, message = MALFORMED[index]
    engine = _bundle_copy(tiny_engine, tmp_path / "bundle")
    mpath = Path(f"{engine}.manifest.json")
    mpath.write_text(make(json.dumps(json.loads(mpath.read_text()))))
    for verify in ([], ["--no-verify-engine"]):  # validation is never skipped
        assert _encode_cli(engine, tmp_path, *verify) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {mpath}: ") and message in err, err[:300]
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_a_checkpoint_folder_given_as_engine_says_how_to_export_it(tmp_path, capsys):
    from tests.conftest import TINY

    assert _encode_cli(TINY, tmp_path) == 2
    err = capsys.readouterr().err
    assert f"{TINY}: this is a checkpoint folder, not an engine: export it first (python -m export {TINY} --out NAME.onnx)" in err
    with pytest.raises(EngineError, match="a folder, not an engine file"):
        load_manifest(tmp_path)


def test_a_folder_holding_a_bundle_names_its_engines(tiny_engine, tmp_path):
    _bundle_copy(tiny_engine, tmp_path / "models")
    with pytest.raises(EngineError, match=r"a folder, not an engine file .*; it holds tiny.onnx: pass one of them"):
        load_manifest(tmp_path / "models")


@pytest.mark.parametrize("missing", [".manifest.json", ".tokenizer.json"])
def test_an_engine_copied_without_its_sidecars_names_the_bundle_files(tiny_engine, tmp_path, missing):
    engine = _bundle_copy(tiny_engine, tmp_path / "bundle")
    Path(f"{engine}{missing}").unlink()
    with pytest.raises(EngineError) as exc:
        load_manifest(engine)
    assert f"{engine}{missing}: " in str(exc.value)
    assert "an engine is a bundle of files that must stay together in one folder: tiny.onnx, tiny.onnx.manifest.json, " \
           "tiny.onnx.tokenizer.json" in str(exc.value)


def test_a_format_1_manifest_loads_only_unverified(tiny_engine, tmp_path):
    legacy = json.loads(Path(f"{tiny_engine}.manifest.json").read_text())
    legacy["format"] = "instructor-engine/1"
    del legacy["seal"]
    engine = _bundle_copy(tiny_engine, tmp_path / "bundle")
    Path(f"{engine}.manifest.json").write_text(json.dumps(legacy))
    with pytest.raises(EngineError, match="format instructor-engine/1 carries no seal.*--no-verify-engine"):
        load_manifest(engine)
    assert load_manifest(engine, verify_engine=False).embedding_dim == 32


def _fake_bundle(tiny_engine: Path, folder: Path, suffix: str, **fields: object) -> Path:
    """A sealed bundle of another engine kind (the engine file is the ONNX bytes: the manifest is what is tested)."""
    from runtime.bundle import ENGINE_KINDS, sha256_file
    from runtime.manifest_schema import seal

    folder.mkdir()
    engine = folder / f"tiny{suffix}"
    shutil.copyfile(tiny_engine, engine)
    shutil.copyfile(f"{tiny_engine}.tokenizer.json", f"{engine}.tokenizer.json")
    data = json.loads(Path(f"{tiny_engine}.manifest.json").read_text())
    data["engine"] = {"kind": ENGINE_KINDS[suffix], "file": engine.name, "bytes": engine.stat().st_size, "sha256": sha256_file(engine)}
    data.update(fields)
    Path(f"{engine}.manifest.json").write_text(json.dumps(seal(data)))
    return engine


PLAN = {"version": "10.13.0.35", "compute_capability": "9.0",
        "profile": {"input_ids": {"min": [1, 1], "opt": [16, 128], "max": [32, 512]}}}
PT2 = {"format": "aoti", "torch": "2.13.0+cpu", "device": "cpu", "max_batch": 1024, "max_seq_length": 512}


@pytest.mark.parametrize("suffix,fields,message", [
    (".plan", {"tensorrt": PLAN}, None),
    (".plan", {}, "manifest field 'tensorrt' is missing"),
    (".plan", {"tensorrt": {**PLAN, "compute_capability": "nine"}}, "manifest field 'tensorrt.compute_capability' must be"),
    (".plan", {"tensorrt": PLAN, "precision": "int8"}, "manifest field 'precision' = 'int8': tensorrt engines are fp32, fp16, bf16"),
    (".plan", {"tensorrt": {**PLAN, "profile": {"input_ids": {"max": [32, 128]}}}},
     "manifest field 'max_seq_length' = 512 is past the TensorRT profile's longest sequence"),
    (".pt2", {"pt2": PT2}, None),
    (".pt2", {}, "manifest field 'pt2' is missing"),
    (".pt2", {"pt2": {**PT2, "device": "tpu"}}, "manifest field 'pt2.device' must be one of \"cpu\", \"cuda\""),
    (".pt2", {"pt2": {**PT2, "max_seq_length": 128}}, "is past the longest sequence the .pt2 was compiled for"),
    (".pt2", {"pt2": PT2, "tensorrt": PLAN}, "manifest field 'tensorrt' belongs to tensorrt engines, not pt2"),
    (".onnx", {"pt2": PT2}, "manifest field 'pt2' belongs to pt2 engines, not onnx"),
])
def test_plan_and_pt2_manifests_are_validated_too(tiny_engine, tmp_path, suffix, fields, message):
    engine = _fake_bundle(tiny_engine, tmp_path / "bundle", suffix, **fields)
    if message is None:
        assert load_manifest(engine).kind == {".plan": "tensorrt", ".pt2": "pt2"}[suffix]
        return
    with pytest.raises(EngineError, match=message.replace("(", r"\(").replace(".", r"\.")):
        load_manifest(engine)


def test_an_opened_engine_is_compared_with_its_manifest(tiny_engine):
    """What each backend hands ``check_engine``: names, the output width (TensorRT), the record (.pt2 metadata)."""
    from runtime.bundle import INPUT_NAMES, OUTPUT_NAME
    from runtime.manifest_schema import RECORD_KEY

    import onnxruntime as ort

    manifest = load_manifest(tiny_engine)
    record = ort.InferenceSession(str(tiny_engine)).get_modelmeta().custom_metadata_map[RECORD_KEY]
    manifest.check_engine(INPUT_NAMES, OUTPUT_NAME, 32, record, carries_record=True)
    with pytest.raises(EngineError, match="the engine's output has 384"):
        manifest.check_engine(INPUT_NAMES, OUTPUT_NAME, 384)
    with pytest.raises(EngineError, match="engine inputs .* expected"):
        manifest.check_engine(["input_ids", "attention_mask"], OUTPUT_NAME, 32)
    with pytest.raises(EngineError, match="carries no record of its export"):
        manifest.check_engine(INPUT_NAMES, OUTPUT_NAME, None, None, carries_record=True)
    with pytest.raises(EngineError, match="record .* is unreadable"):
        manifest.check_engine(INPUT_NAMES, OUTPUT_NAME, None, "{not json", carries_record=True)
    other = json.loads(record)
    other["do_lower_case"] = True
    with pytest.raises(EngineError, match="'do_lower_case' = false, but the engine itself was exported with true"):
        manifest.check_engine(INPUT_NAMES, OUTPUT_NAME, None, json.dumps(other), carries_record=True)
    unverified = load_manifest(tiny_engine, verify_engine=False)
    unverified.check_engine(INPUT_NAMES, OUTPUT_NAME, None, json.dumps(other), carries_record=True)  # a setting


# -- 6. bad rows stay bad rows -----------------------------------------------------------------------------------

DEEP = '{"text": "x", "deep": ' + "[" * 200_000 + "]" * 200_000 + "}"
BIG = '{"text": "x", "n": ' + "7" * 5000 + "}"


@pytest.mark.parametrize("line,message", [
    ('{"text": "caf\\ud800"}', "d.jsonl:2: field 'text': invalid unicode (lone surrogate)"),
    ('{"text": "ok", "q": "\\udfff"}', "d.jsonl:2: field 'q': invalid unicode (lone surrogate)"),
    (DEEP, "d.jsonl:2: JSON nested too deeply"),
    (BIG, "d.jsonl:2: unreadable JSON value (Exceeds the limit (4300 digits) for integer string conversion"),
])
def test_unembeddable_rows_are_named_and_skippable(tiny_engine, tmp_path, capsys, line, message):
    src = tmp_path / "d.jsonl"
    src.write_text('{"text": "one", "q": "I: "}\n' + line + '\n{"text": "three", "q": "I: "}\n', encoding="utf-8")
    base = ["--engine", str(tiny_engine), "--input", str(src), "--quiet", "--instruction-field", "q"]
    if "'q'" not in message:
        base = base[:-2]
    assert encode.main([*base, "--output", str(tmp_path / "a.npy")]) == encode.EXIT_INPUT
    err = capsys.readouterr().err
    assert message in err.replace(f"{tmp_path}/", "") and "Traceback" not in err
    assert encode.main([*base, "--output", str(tmp_path / "b.npy"), "--on-error", "skip"]) == 0
    s = json.loads(summary_path(tmp_path / "b.npy").read_text())
    assert s["rows"] == 2 and s["skipped_lines"] == [2]


def test_the_python_api_names_a_lone_surrogate(tiny_engine):
    with Encoder(tiny_engine) as enc, pytest.raises(ValueError, match=r"input 1: the text \(element 1\) is invalid unicode"):
        enc.encode(["fine", ["I: ", "bad \udc80"]])


# -- files as their writers write them ------------------------------------------------------------------------------


def test_blank_jsonl_lines_are_skipped_and_counted(tiny_engine, tmp_path):
    src = tmp_path / "d.jsonl"
    src.write_text('{"text": "one"}\n\n{"text": "two"}\n   \n{"text": "bad": 1}\n{"text": "four"}\n\n', encoding="utf-8")
    out = tmp_path / "o.parquet"
    rc = encode.main(["--engine", str(tiny_engine), "--input", str(src), "--output", str(out), "--quiet", "--on-error", "skip"])
    assert rc == 0
    s = json.loads(summary_path(out).read_text())
    assert s["rows"] == 3 and s["blank_lines"] == 3 and s["skipped_lines"] == [5]
    import pyarrow.parquet as pq

    assert pq.read_table(out).column("line").to_pylist() == [1, 3, 6]  # real rows keep their line numbers


@pytest.mark.parametrize("name,content,extra", [
    ("d.jsonl", '\ufeff{"text": "first row"}\n{"text": "second"}\n', []),
    ("d.csv", "\ufefftext,id\nfirst row,1\nsecond,2\n", ["--text-field", "text"]),
    ("d.txt", "\ufefffirst row\nsecond\n", []),
])
def test_a_byte_order_mark_is_not_part_of_the_data(tiny_engine, tmp_path, name, content, extra):
    src = tmp_path / name
    src.write_text(content, encoding="utf-8")
    out = tmp_path / "o.npy"
    assert encode.main(["--engine", str(tiny_engine), "--input", str(src), "--output", str(out), "--quiet", *extra]) == 0
    np.testing.assert_allclose(np.load(out), reference(tiny_engine, ["first row", "second"]), atol=1e-6, rtol=0)


# -- 7. outputs that would destroy something, and system errors ----------------------------------------------------


def test_an_output_that_is_the_input_is_refused_even_with_overwrite(tiny_engine, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = tmp_path / "x.parquet"
    pq.write_table(pa.table({"text": ["a", "b"]}), src)
    before = src.read_bytes()
    (tmp_path / "link.parquet").symlink_to(src)
    for output in (src, tmp_path / "link.parquet", tmp_path / "sub" / ".." / "x.parquet"):
        rc = encode.main(["--engine", str(tiny_engine), "--input", str(src), "--output", str(output), "--overwrite", "--quiet"])
        assert rc == 2 and "the output is the input file" in capsys.readouterr().err
    assert src.read_bytes() == before


def test_an_output_that_is_a_folder_is_refused(tiny_engine, tmp_path, capsys):
    src = write_jsonl(tmp_path / "d.jsonl", ["x"])
    (tmp_path / "out.npy").mkdir()
    rc = encode.main(["--engine", str(tiny_engine), "--input", str(src), "--output", str(tmp_path / "out.npy"), "--overwrite", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "is a folder" in err and "Traceback" not in err


@pytest.mark.parametrize("code,what", [(errno.ENOSPC, "No space left on device"), (errno.EROFS, "Read-only file system")])
def test_disk_errors_end_in_a_message_and_the_same_command_resumes(tiny_engine, tmp_path, capsys, monkeypatch, code, what):
    from runtime.files import resume

    src = write_jsonl(tmp_path / "d.jsonl", texts(30, "alpha"))
    out = tmp_path / "o.npy"
    args = ["--engine", str(tiny_engine), "--input", str(src), "--output", str(out), "--shard-rows", "8", "--quiet"]
    real_save = resume.ShardStore.save_shard

    def failing_save(self, *a, **k):
        if len(self.shards) == 2:
            raise OSError(code, os.strerror(code), str(self.shard_path(2)))
        return real_save(self, *a, **k)

    monkeypatch.setattr(resume.ShardStore, "save_shard", failing_save)
    assert encode.main(args) == encode.EXIT_ENVIRONMENT
    err = capsys.readouterr().err
    assert what in err and "run the same command again to resume" in err and "Traceback" not in err
    monkeypatch.undo()
    assert encode.main(args) == 0
    assert json.loads(summary_path(out).read_text())["resumed_rows"] == 16
    np.testing.assert_allclose(np.load(out), reference(tiny_engine, texts(30, "alpha")), atol=1e-6, rtol=0)


# -- optional dependencies: one exception, one message, exit 3 --------------------------------------------------------


def test_a_missing_optional_package_names_its_extra(tiny_engine, tmp_path, capsys, monkeypatch):
    from runtime.deps import MissingDependency, require

    with pytest.raises(MissingDependency, match=r"frobnicating needs no_such_pkg .*pip install 'instructor-stack\[io\]'"):
        require("no_such_pkg.sub", "io", "frobnicating")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if pyarrow were not installed
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    src = write_jsonl(tmp_path / "d.jsonl", ["x"])
    rc = encode.main(["--engine", str(tiny_engine), "--input", str(src), "--output", str(tmp_path / "o.parquet"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == encode.EXIT_ENVIRONMENT and "writing .parquet needs pyarrow" in err and "pip install 'instructor-stack[io]'" in err
