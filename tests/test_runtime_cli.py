"""``python -m runtime.encode``: every input and output format, the summary, bad inputs and bad engines."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from runtime import encode
from runtime.encoder import Encoder
from runtime.job import summary_path
from runtime.manifest_schema import seal

INSTR = "Represent the document for retrieval: "
DOCS = [
    {"id": "a", "text": "The Moon is locked to Earth.", "q": INSTR},
    {"id": "b", "text": "", "q": INSTR},  # empty text: encoded as the reference does
    {"id": "c", "text": "  padded with spaces  ", "q": "Q:"},
    {"id": 7, "text": "word " * 700, "q": INSTR},  # over 512 tokens: truncated and counted
    {"id": "e", "text": "Ünïcödé text, ok.", "q": "the"},
]


@pytest.fixture(scope="module")
def reference(tiny_engine) -> np.ndarray:
    with Encoder(tiny_engine) as enc:
        return enc.encode([[d["q"], d["text"]] for d in DOCS])


def run_cli(tiny_engine, tmp_path, name, content, *extra, output="out.npy", engine=None):
    src = tmp_path / name
    if isinstance(content, bytes):
        src.write_bytes(content)
    else:
        src.write_text(content, encoding="utf-8")
    out = tmp_path / output
    argv = ["--engine", str(engine or tiny_engine), "--input", str(src), "--output", str(out), "--quiet", *extra]
    return encode.main(argv), out


def jsonl(rows) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def summary_of(out: Path) -> dict:
    return json.loads(summary_path(out).read_text())


def test_jsonl_to_npy_with_summary(tiny_engine, tmp_path, reference, capsys):
    rc, out = run_cli(tiny_engine, tmp_path, "docs.jsonl", jsonl(DOCS), "--instruction-field", "q", "--shard-rows", "2")
    assert rc == 0
    got = np.load(out)
    assert got.dtype == np.float32 and got.shape == (5, 32)
    assert np.abs(got - reference).max() <= 1e-5
    s = summary_of(out)
    assert s["rows"] == 5 and s["truncated_rows"] == 1 and s["skipped_rows"] == 0
    assert s["tokens"] > 512 and 0 <= s["padding_waste"] < 1 and s["docs_per_s"] > 0 and s["tokens_per_s"] > 0
    manifest = Path(f"{tiny_engine}.manifest.json")

    assert s["engine_manifest_sha256"] == hashlib.sha256(manifest.read_bytes()).hexdigest()
    assert not Path(f"{out}.parts").exists()  # shards cleaned up after publishing
    assert capsys.readouterr().out == ""  # --quiet


def test_prints_summary_without_quiet(tiny_engine, tmp_path, capsys):
    src = tmp_path / "d.txt"
    src.write_text("x\ny\n", encoding="utf-8")
    rc = encode.main(["--engine", str(tiny_engine), "--input", str(src), "--output", str(tmp_path / "o.npy")])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["rows"] == 2 and printed == summary_of(tmp_path / "o.npy")


def test_txt_csv_tsv_parquet_inputs_agree(tiny_engine, tmp_path, reference):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    texts = [d["text"] for d in DOCS]
    with Encoder(tiny_engine) as enc:
        plain = enc.encode([[INSTR, t] for t in texts])
    txt = "".join(t + "\n" for t in texts)
    rc, out = run_cli(tiny_engine, tmp_path, "d.txt", txt, "--instruction", INSTR, output="txt.npy")
    assert rc == 0 and np.abs(np.load(out) - plain).max() <= 1e-5

    def sv(sep):
        import csv
        import io

        buf = io.StringIO()
        w = csv.writer(buf, delimiter=sep, lineterminator="\n")
        w.writerow(["id", "body", "q"])
        for d in DOCS:
            w.writerow([d["id"], d["text"], d["q"]])
        return buf.getvalue()

    for name, sep in (("d.csv", ","), ("d.tsv", "\t")):
        rc, out = run_cli(tiny_engine, tmp_path, name, sv(sep), "--text-field", "body", "--instruction-field", "q",
                          output=f"{name}.npy")
        assert rc == 0 and np.abs(np.load(out) - reference).max() <= 1e-5

    table = pa.table({"id": [str(d["id"]) for d in DOCS], "body": texts, "q": [d["q"] for d in DOCS]})
    pq.write_table(table, tmp_path / "d.parquet")
    out = tmp_path / "pq.npy"
    rc = encode.main(["--engine", str(tiny_engine), "--input", str(tmp_path / "d.parquet"), "--output", str(out),
                      "--text-field", "body", "--instruction-field", "q", "--quiet"])
    assert rc == 0 and np.abs(np.load(out) - reference).max() <= 1e-5


def test_parquet_output_with_ids_and_float16(tiny_engine, tmp_path, reference):
    pq = pytest.importorskip("pyarrow.parquet")
    rc, out = run_cli(tiny_engine, tmp_path, "docs.jsonl", jsonl(DOCS), "--instruction-field", "q", "--id-field", "id",
                      "--dtype", "float16", "--shard-rows", "2", output="emb.parquet")
    assert rc == 0
    table = pq.read_table(out)
    assert table.column_names == ["line", "id", "embedding"]
    assert table.column("id").to_pylist() == ["a", "b", "c", "7", "e"]
    assert table.column("line").to_pylist() == [1, 2, 3, 4, 5]
    emb = np.array(table.column("embedding").to_pylist(), dtype=np.float32)
    assert table.schema.field("embedding").type.value_type == "halffloat"
    np.testing.assert_array_equal(emb, reference.astype(np.float16).astype(np.float32))
    rc, out16 = run_cli(tiny_engine, tmp_path, "docs2.jsonl", jsonl(DOCS), "--instruction-field", "q",
                        "--dtype", "float16", output="emb16.npy")
    assert rc == 0 and np.load(out16).dtype == np.float16


@pytest.mark.parametrize(
    "name,content,extra,message",
    [
        ("d.jsonl", '{"text": "ok"}\n{"text": "broken\n', [], r"d.jsonl:2: malformed JSON"),
        ("d.jsonl", '{"text": "ok"}\n{"body": "x"}\n', [], r"d.jsonl:2: field 'text': missing"),
        ("d.jsonl", '{"text": "ok"}\n{"text": 5}\n', [], r"d.jsonl:2: field 'text': expected a string, got int 5"),
        ("d.jsonl", '{"text": null}\n', [], r"d.jsonl:1: field 'text': expected a string, got NoneType null"),
        ("d.jsonl", '{"text": "a"}\n["text"]\n', [], r"d.jsonl:2: expected a JSON object, got list"),
        ("d.jsonl", '{"text": "ok", "q": 1}\n', ["--instruction-field", "q"], r"d.jsonl:1: field 'q': expected a string"),
        ("d.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n', [], r"d.jsonl:2: not valid UTF-8"),
        ("d.csv", "id,text\n1,hello\n", ["--text-field", "body"], r"d.csv:1: field 'body': no such column"),
        ("d.csv", "id,text\n1,hello\n2,a,b\n", [], r"d.csv:3: 3 cells, the header has 2"),
        ("d.csv", b"id,text\n1,hello\n2,\xff\xfe\n", [], r"d.csv:3: not valid UTF-8"),
        ("d.txt", b"fine\n\xc3(bad\n", [], r"d.txt:2: not valid UTF-8"),
        ("d.xml", "<a/>", [], r"unknown input type '.xml'"),
    ],
)
def test_bad_input_names_file_line_and_field(tiny_engine, tmp_path, capsys, name, content, extra, message):
    rc, out = run_cli(tiny_engine, tmp_path, name, content, *extra)
    assert rc == encode.EXIT_INPUT
    err = capsys.readouterr().err
    assert message.replace("\\", "") in err.replace(str(tmp_path) + "/", "")
    assert not out.exists()


def test_parquet_input_errors(tiny_engine, tmp_path, capsys):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"text": ["ok", None]}), tmp_path / "d.parquet")
    rc = encode.main(["--engine", str(tiny_engine), "--input", str(tmp_path / "d.parquet"),
                      "--output", str(tmp_path / "o.npy"), "--quiet"])
    assert rc == encode.EXIT_INPUT and "d.parquet:2: field 'text': expected a string" in capsys.readouterr().err
    rc = encode.main(["--engine", str(tiny_engine), "--input", str(tmp_path / "d.parquet"),
                      "--output", str(tmp_path / "o.npy"), "--text-field", "body", "--quiet"])
    assert rc == encode.EXIT_INPUT and "field 'body': no such column" in capsys.readouterr().err


def test_on_error_skip_records_line_numbers(tiny_engine, tmp_path):
    content = b'{"text": "one"}\n{"text": 5}\nnot json\n{"text": "four"}\n{"t": "x"}\n{"text": "caf\xe9"}\n{"text": "seven"}\n'
    rc, out = run_cli(tiny_engine, tmp_path, "d.jsonl", content, "--on-error", "skip", "--shard-rows", "2")
    assert rc == 0
    s = summary_of(out)
    assert s["rows"] == 3 and s["skipped_rows"] == 4 and s["skipped_lines"] == [2, 3, 5, 6]
    assert "d.jsonl:2: field 'text'" in s["skipped_errors"][0]
    with Encoder(tiny_engine) as enc:
        assert np.abs(np.load(out) - enc.encode(["one", "four", "seven"])).max() <= 1e-5


def test_empty_input_gives_empty_output(tiny_engine, tmp_path):
    rc, out = run_cli(tiny_engine, tmp_path, "d.jsonl", "")
    assert rc == 0 and np.load(out).shape == (0, 32) and summary_of(out)["rows"] == 0


def test_existing_output_needs_overwrite(tiny_engine, tmp_path, capsys):
    rc, out = run_cli(tiny_engine, tmp_path, "d.txt", "a\n")
    assert rc == 0
    rc, _ = run_cli(tiny_engine, tmp_path, "d.txt", "a\nb\n")
    assert rc == encode.EXIT_SETUP and "--overwrite" in capsys.readouterr().err
    rc, _ = run_cli(tiny_engine, tmp_path, "d.txt", "a\nb\n", "--overwrite")
    assert rc == 0 and np.load(out).shape == (2, 32)


def test_option_errors(tiny_engine, tmp_path, capsys):
    rc, _ = run_cli(tiny_engine, tmp_path, "d.jsonl", jsonl(DOCS), "--id-field", "id")  # .npy has no ids
    assert rc == encode.EXIT_SETUP and "--id-field needs a .parquet output" in capsys.readouterr().err
    rc, _ = run_cli(tiny_engine, tmp_path, "d.jsonl", jsonl(DOCS), output="out.csv")
    assert rc == encode.EXIT_SETUP and "output must end in .npy or .parquet" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        encode.main(["--engine", "e.onnx", "--input", "x.txt", "--output", "o.npy", "--instruction", "I", "--instruction-field", "q"])
    assert exc.value.code == 2


def _bundle_copy(tiny_engine: Path, dst: Path, name: str = "copy.onnx") -> Path:
    dst.mkdir(exist_ok=True)
    engine = dst / name
    for suffix in ("", ".manifest.json", ".tokenizer.json"):
        shutil.copyfile(f"{tiny_engine}{suffix}", f"{engine}{suffix}")
    return engine


@pytest.mark.parametrize("damage,message", [
    ("missing", "engine file not found"),
    ("no-manifest", "manifest not found"),
    ("corrupt-manifest", "corrupt manifest"),
    ("tokenizer", "tokenizer sha256 differs from the manifest"),
    ("truncated", "the manifest says"),
    ("garbage", "sha256 differs from the manifest's (corrupt or replaced)"),
    ("garbage-unverified", "ONNX Runtime cannot load the engine"),
    ("plan", "TensorRT"),
])
def test_bad_engine_exits_2_with_a_clear_message(tiny_engine, tmp_path, capsys, damage, message):
    engine = _bundle_copy(tiny_engine, tmp_path / "bundle")
    if damage == "missing":
        engine.unlink()
    elif damage == "no-manifest":
        Path(f"{engine}.manifest.json").unlink()
    elif damage == "corrupt-manifest":
        Path(f"{engine}.manifest.json").write_text("{not json")
    elif damage == "tokenizer":
        with open(f"{engine}.tokenizer.json", "a") as fh:
            fh.write(" ")
    elif damage == "truncated":
        engine.write_bytes(engine.read_bytes()[:1000])
    elif damage.startswith("garbage"):  # right size, wrong bytes
        engine.write_bytes(bytes(engine.stat().st_size))
    elif damage == "plan":  # a .plan bundle on a machine without TensorRT / with another TensorRT or GPU
        plan = engine.with_suffix(".plan")
        manifest = json.loads(Path(f"{engine}.manifest.json").read_text())
        manifest["engine"].update(kind="tensorrt", file=plan.name, bytes=4, sha256=hashlib.sha256(b"junk").hexdigest())
        manifest["tensorrt"] = {"version": "0.0.0", "compute_capability": "1.0",
                                "profile": {"input_ids": {"min": [1, 1], "opt": [1, 1], "max": [1, 512]}}}
        plan.write_bytes(b"junk")
        Path(f"{plan}.manifest.json").write_text(json.dumps(seal(manifest)))  # sealed, as an export writes it
        shutil.copyfile(f"{engine}.tokenizer.json", f"{plan}.tokenizer.json")
        engine = plan
    extra = ["--no-verify-engine"] if damage.endswith("unverified") else []
    rc, out = run_cli(tiny_engine, tmp_path, "d.txt", "a\n", *extra, engine=engine)
    # a .plan without the tensorrt package is the environment's doing (3); with it, this plan is the wrong one (2)
    no_tensorrt = damage == "plan" and importlib.util.find_spec("tensorrt") is None
    assert rc == (encode.EXIT_ENVIRONMENT if no_tensorrt else encode.EXIT_SETUP)
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_demo_reuses_a_cached_engine_and_searches(tiny_engine, tmp_path, capsys):
    """``make demo`` with an engine already in its workdir (its export step is `python -m export`, tested there)."""
    from runtime import demo

    _bundle_copy(tiny_engine, tmp_path, demo.ENGINE_NAME)
    assert demo.main(["--workdir", str(tmp_path), "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "reusing engine" in out and '"rows": 248' in out
    assert "query: " in out and len([line for line in out.splitlines() if " doc-" in line]) == 3
    assert np.load(tmp_path / "sample_corpus.npy").shape == (248, 32)


# -- rows with an instruction field but no --instruction-field (issue 32) --------------------------------------------


def _instructed_rows(tmp_path: Path, kind: str) -> Path:
    rows = [{"text": f"row {i}", "instruction": INSTR} for i in range(5)]
    src = tmp_path / f"d.{kind}"
    if kind == "jsonl":
        src.write_text(jsonl([{"text": "first row has none"}] + rows), encoding="utf-8")
    elif kind == "csv":
        src.write_text("text,instruction\n" + "".join(f"{r['text']},{r['instruction']}\n" for r in rows), encoding="utf-8")
    else:
        pa = pytest.importorskip("pyarrow")
        pytest.importorskip("pyarrow.parquet").write_table(pa.Table.from_pylist(rows), src)
    return src


@pytest.mark.parametrize("kind,where", [("jsonl", "d.jsonl:2: "), ("csv", "d.csv:1: "), ("parquet", "d.parquet: ")])
def test_an_unused_instruction_field_is_warned_once_and_in_the_summary(tiny_engine, tmp_path, capsys, kind, where):
    src = _instructed_rows(tmp_path, kind)
    out = tmp_path / "o.npy"
    assert encode.main(["--engine", str(tiny_engine), "--input", str(src), "--output", str(out), "--quiet",
                        "--shard-rows", "2"]) == 0
    err = capsys.readouterr().err.replace(str(tmp_path) + "/", "")
    assert err.count("warning: ") == 1
    assert f"warning: {where}rows have an 'instruction' field, but without --instruction-field it is not used" in err
    assert "--instruction-field instruction" in err
    [warning] = summary_of(out)["warnings"]
    assert warning.replace(str(tmp_path) + "/", "") == err.split("warning: ")[1].strip()
    with Encoder(tiny_engine) as enc:  # still what was asked: plain text
        texts = (["first row has none"] if kind == "jsonl" else []) + [f"row {i}" for i in range(5)]
        assert np.abs(np.load(out) - enc.encode(texts)).max() <= 1e-5


@pytest.mark.parametrize("extra", [["--instruction-field", "instruction"], ["--instruction", INSTR]])
def test_no_warning_when_an_instruction_is_given(tiny_engine, tmp_path, capsys, extra):
    src = _instructed_rows(tmp_path, "jsonl")
    src.write_text(src.read_text().replace('{"text": "first row has none"}', '{"text": "x", "instruction": "I"}'))
    out = tmp_path / "o.npy"
    assert encode.main(["--engine", str(tiny_engine), "--input", str(src), "--output", str(out), "--quiet", *extra]) == 0
    assert "warning" not in capsys.readouterr().err and "warnings" not in summary_of(out)


# -- errors that name the right file and place (issue 32) ------------------------------------------------------------


def test_a_damaged_parquet_row_group_is_named(tiny_engine, tmp_path, capsys):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    src = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": [f"document number {i} " * 3 for i in range(12)]}), src, row_group_size=4)
    column = pq.ParquetFile(src).metadata.row_group(1).column(0)  # rows 5-8
    start = column.dictionary_page_offset or column.data_page_offset
    data = bytearray(src.read_bytes())
    data[start:start + column.total_compressed_size] = b"\xff" * column.total_compressed_size
    src.write_bytes(bytes(data))
    rc = encode.main(["--engine", str(tiny_engine), "--input", str(src), "--output", str(tmp_path / "o.npy"), "--quiet",
                      "--on-error", "skip"])
    err = capsys.readouterr().err
    assert rc == encode.EXIT_INPUT and len(err.splitlines()) == 1
    assert f"error: {src}: row group 1 (rows 5-8) is damaged and cannot be read" in err
    assert not (tmp_path / "o.npy").exists()


def test_a_chunk_overlap_past_the_window_is_refused_before_any_work(tiny_engine, tmp_path, capsys):
    src = tmp_path / "d.jsonl"
    src.write_text(jsonl([{"text": "word " * 600}] * 3), encoding="utf-8")
    out = tmp_path / "o.npy"
    args = ["--engine", str(tiny_engine), "--input", str(src), "--output", str(out), "--quiet", "--long-text", "chunk"]
    assert encode.main([*args, "--chunk-overlap", "511"]) == encode.EXIT_SETUP
    err = capsys.readouterr().err
    assert err == ("error: --chunk-overlap 511: must be in [0, 510] for this engine (max_seq_length 512, of which "
                   "1 special token)\n")
    assert not out.exists() and not Path(f"{out}.parts").exists()
    assert encode.main([*args, "--chunk-overlap", "300", "--instruction", "Represent " + "very " * 300 + ": "]) == 2
    assert "--chunk-overlap 300: must be in [0, 20" in capsys.readouterr().err  # --instruction's tokens count too
    assert encode.main([*args, "--chunk-overlap", "510", "--overwrite"]) == 0


def test_a_row_whose_instruction_leaves_no_room_is_named_by_line(tiny_engine, tmp_path, capsys):
    rows = [{"text": "word " * 600, "q": INSTR}] * 3 + [{"text": "word " * 600, "q": "Represent " + "very " * 500}]
    src = tmp_path / "d.jsonl"
    src.write_text(jsonl(rows), encoding="utf-8")
    rc = encode.main(["--engine", str(tiny_engine), "--input", str(src), "--output", str(tmp_path / "o.npy"), "--quiet",
                      "--long-text", "chunk", "--instruction-field", "q", "--shard-rows", "2"])
    err = capsys.readouterr().err
    assert rc == encode.EXIT_INPUT
    assert f"error: {src}:4: field 'q': the instruction takes 5" in err and "(lower the overlap or shorten the instruction)" in err
    assert "input " not in err


def test_an_output_in_a_missing_folder_names_the_folder(tiny_engine, tmp_path, capsys):
    out = tmp_path / "no-such-folder" / "o.npy"
    rc, _ = run_cli(tiny_engine, tmp_path, "d.txt", "a\n", output=str(out.relative_to(tmp_path)))
    err = capsys.readouterr().err
    assert rc == encode.EXIT_SETUP and ".lock" not in err
    assert f"the output's folder {out.parent} does not exist" in err
    assert not out.parent.exists()
