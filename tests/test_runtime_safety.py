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
    ("max_seq_length", "512", "manifest field 'max_seq_length' must be a positive integer"),
    ("embedding_dim", None, "manifest field 'embedding_dim' must be a positive integer"),
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
    from runtime import resume

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
