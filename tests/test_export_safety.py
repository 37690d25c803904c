"""Export leftovers and system errors: a killed export's temp folder is removed by the next one, a full disk is a
one-line message with exit 3; the exit-code contract, an existing bundle kept without --overwrite, --out checked
before the slow part, progress lines."""

from __future__ import annotations

import errno
import io
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import export.build as build
from export.__main__ import main as export_main
from export.progress import Progress
from runtime.files.locks import OWNER_FILE
from tests.conftest import TINY

ROOT = Path(__file__).resolve().parents[1]


def test_a_killed_exports_temp_folder_is_removed_by_the_next_export(tmp_path):
    out = tmp_path / "tiny.onnx"
    proc = subprocess.Popen([sys.executable, "-m", "export", str(TINY), "--out", str(out)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    leftovers: list[Path] = []
    while time.monotonic() < deadline and proc.poll() is None:
        leftovers = [d for d in tmp_path.glob(".tiny.onnx.tmp-*") if (d / "fp32.onnx").is_file()]
        if leftovers:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL and leftovers, "the export ended before it could be killed"
    assert leftovers[0].is_dir() and not out.exists()
    old = time.time() - 60  # the dead owner's lock file is no longer fresh
    os.utime(leftovers[0] / OWNER_FILE, (old, old))
    assert export_main([str(TINY), "--out", str(out)]) == 0
    assert not leftovers[0].exists() and out.is_file()
    assert not list(tmp_path.glob(".tiny.onnx.tmp-*"))


def test_a_live_exports_temp_folder_is_left_alone(tmp_path):
    from runtime.files.locks import owned_temp_dir, remove_stale_dirs

    with owned_temp_dir(tmp_path, ".x.onnx.tmp-") as live:
        old = time.time() - 60
        os.utime(live / OWNER_FILE, (old, old))
        assert remove_stale_dirs(tmp_path, ".x.onnx.tmp-") == [] and live.is_dir()


def test_a_full_disk_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "fp32.onnx"))

    monkeypatch.setattr(build, "export_onnx", full)
    assert export_main([str(TINY), "--out", str(tmp_path / "x.onnx"), "--quiet"]) == 3  # the environment
    err = capsys.readouterr().err
    assert "No space left on device (errno 28); no engine was written" in err and "Traceback" not in err
    assert not (tmp_path / "x.onnx").exists() and not list(tmp_path.glob(".x.onnx.tmp-*"))


# -- the exit-code contract, an existing bundle, --out checked before the slow part ----------------------------------


def _no_load(monkeypatch) -> None:
    """Fail the test if the export gets as far as loading the checkpoint (the checks must come first)."""

    def refuse(*args, **kwargs):
        raise AssertionError("the checkpoint was loaded before the output was checked")

    monkeypatch.setattr(build.InstructorModel, "from_pretrained", refuse)


@pytest.mark.parametrize("existing", [("",), (".manifest.json",), ("", ".manifest.json", ".tokenizer.json")])
def test_an_existing_bundle_is_refused_without_overwrite_before_any_work(tmp_path, capsys, monkeypatch, existing):
    out = tmp_path / "x.onnx"
    for suffix in existing:
        Path(f"{out}{suffix}").write_text("the old bundle")
    _no_load(monkeypatch)
    assert export_main([str(TINY), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    names = ", ".join(f"x.onnx{suffix}" for suffix in existing)
    assert f"error: {out}: a bundle is already there ({names}); pass --overwrite to replace it" in err
    assert all(Path(f"{out}{suffix}").read_text() == "the old bundle" for suffix in existing)


def test_overwrite_replaces_a_bundle_and_every_step_prints_its_time(tmp_path, capfd):
    out = tmp_path / "x.onnx"
    for suffix in ("", ".manifest.json", ".tokenizer.json"):
        Path(f"{out}{suffix}").write_text("the old bundle")
    assert export_main([str(TINY), "--out", str(out), "--overwrite"]) == 0
    from runtime.bundle import load_manifest

    assert load_manifest(out).embedding_dim == 32 and not Path(f"{out}.lock").exists()
    err = capfd.readouterr().err
    for step in (f"load checkpoint {TINY}", "PyTorch fp32 reference on the calibration set (cpu)", "ONNX export (torch.onnx)",
                 "graph candidate 't5_attention': optimize", "graph candidate 't5_attention': parity vs PyTorch"):
        assert re.search(rf"^export \[ *\d+\.\d s\] {re.escape(step)} \.\.\.$", err, re.M), step
        assert re.search(rf"^export \[ *\d+\.\d s\] {re.escape(step)}: \d+\.\d s$", err, re.M), step
    assert re.search(rf"^export \[ *\d+\.\d s\] wrote {re.escape(str(out))}$", err, re.M)


def test_quiet_turns_the_progress_lines_off(tmp_path, monkeypatch):
    seen = {}

    def fake_export(checkpoint, out, opts):
        seen["progress"] = opts.progress.enabled
        raise build.ExportError("stop here")

    monkeypatch.setattr("export.__main__.export_bundle", fake_export)
    assert export_main([str(TINY), "--out", str(tmp_path / "x.onnx"), "--quiet"]) == 2 and seen == {"progress": False}
    assert export_main([str(TINY), "--out", str(tmp_path / "x.onnx")]) == 2 and seen == {"progress": True}
    lines = io.StringIO()
    Progress(enabled=False, stream=lines).note("nothing")
    with Progress(enabled=False, stream=lines).step("nothing"):
        pass
    assert lines.getvalue() == ""


def test_an_out_that_is_a_folder_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    (tmp_path / "models.onnx").mkdir()
    _no_load(monkeypatch)
    for flags in ([], ["--overwrite"]):
        assert export_main([str(TINY), "--out", str(tmp_path / "models.onnx"), *flags]) == 2
        err = capsys.readouterr().err
        assert f"{tmp_path / 'models.onnx'}: a folder; --out names the engine file to write" in err
        assert ".tmp-" not in err and "Traceback" not in err
    assert export_main([str(TINY), "--out", str(tmp_path)]) == 2
    assert "no engine extension (an engine file ends in .onnx, .plan, .pt2)" in capsys.readouterr().err


def test_a_missing_checkpoint_is_bad_usage(tmp_path, capsys):
    assert export_main([str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.onnx")]) == 2
    assert f"{tmp_path / 'nowhere'}: not found; the checkpoint is a sentence-transformers folder" in capsys.readouterr().err


def test_another_export_to_the_same_out_is_the_environment(tmp_path, capsys, monkeypatch):
    from runtime.files.locks import ExclusiveLock

    out = tmp_path / "x.onnx"
    _no_load(monkeypatch)
    with ExclusiveLock(build.lock_path(out), str(out)):
        assert export_main([str(TINY), "--out", str(out)]) == 3
    err = capsys.readouterr().err
    assert f"error: {out} is in use by another run (pid {os.getpid()}" in err


def test_an_internal_error_is_one_line_with_the_traceback_in_a_log(tmp_path, capsys, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(build.InstructorModel, "from_pretrained", boom)
    assert export_main([str(TINY), "--out", str(tmp_path / "x.onnx"), "--quiet"]) == 4
    err = capsys.readouterr().err
    assert err.startswith("internal error: RuntimeError: boom; traceback in ") and len(err.strip().splitlines()) == 1
    log = Path(err.strip().rsplit("traceback in ", 1)[1])
    assert "Traceback" in log.read_text() and "boom" in log.read_text()
    log.unlink()
    assert export_main([str(TINY), "--out", str(tmp_path / "x.onnx"), "--quiet", "--debug"]) == 4
    assert "Traceback (most recent call last)" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # no lock file, no temp folder left


def test_help_has_the_exit_codes_and_refuses_abbreviations(capsys):
    with pytest.raises(SystemExit) as exc:
        export_main(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps the lines
    assert exc.value.code == 0 and "see below" not in text and "'precisions' in the description above" in text
    assert "exit codes: 0 done; 1 bad input data" in text and "misses the parity gate" in text
    assert "--overwrite" in text and "--debug" in text and "--quiet" in text
    with pytest.raises(SystemExit) as exc:
        export_main([str(TINY), "--out", "x.onnx", "--overwr"])
    assert exc.value.code == 2 and "unrecognized arguments: --overwr" in capsys.readouterr().err


def test_a_plan_without_a_gpu_is_the_environment_and_says_what_it_needs(tmp_path, capsys, monkeypatch):
    from runtime.deps import MissingDependency

    def no_tensorrt(*args, **kwargs):
        raise MissingDependency(".plan engines needs tensorrt (No module named 'tensorrt')")

    monkeypatch.setattr("runtime.deps.require", no_tensorrt)
    monkeypatch.setattr("export.tensorrt.require", no_tensorrt)
    _no_load(monkeypatch)
    assert export_main([str(TINY), "--out", str(tmp_path / "x.plan"), "--precision", "fp16"]) == 3
    err = capsys.readouterr().err
    assert "a .plan is a TensorRT engine, built and verified on an NVIDIA GPU with TensorRT" in err
    assert "export NAME.onnx to run on the CPU" in err and list(tmp_path.iterdir()) == []
    assert export_main([str(TINY), "--out", str(tmp_path / "x.plan"), "--precision", "int8"]) == 2
    assert "int8 engines are ONNX Runtime CPU engines: use --out NAME.onnx" in capsys.readouterr().err


def test_the_exported_bundle_is_sealed_and_the_engine_carries_its_record(tiny_engine):
    import json

    import onnxruntime as ort

    from runtime.manifest_schema import FIELDS, MANIFEST_FORMAT, RECORD_KEY, broken_seal

    data = json.loads(Path(f"{tiny_engine}.manifest.json").read_text())
    assert data["format"] == MANIFEST_FORMAT and broken_seal(data) is None
    assert set(data["seal"]["fields"]) == set(data) - {"seal"} and set(data) <= set(FIELDS)
    record = json.loads(ort.InferenceSession(str(tiny_engine)).get_modelmeta().custom_metadata_map[RECORD_KEY])
    assert record["weight_types"] == ["float", "int64"] and record["max_seq_length"] == data["max_seq_length"] == 512
    assert record["tokenizer.sha256"] == data["tokenizer"]["sha256"] and record["embedding_dim"] == 32


# -- int8: the sensitivity ranking measures with the length-sorted check; every candidate by the gate's full check --


class _FakeVerifier:
    """Parity by (file, fast) from a table: what ``_int8_onnx`` decides on, without quantizing anything."""

    def __init__(self, table):
        from export.parity import GATES

        self.table = table
        self.gate = dict(GATES["int8"])
        self.calls = []

    def check(self, runner, name, fast=False):
        from export.parity import Parity, ParityReport, check_gate

        self.calls.append((runner.path.name, fast))
        cos = self.table[(runner.path.name, fast)]
        parity = Parity(82, cos, cos, 0.01, 0)
        return ParityReport(parity, "ref", name, 16, dict(self.gate), tuple(check_gate(parity, self.gate)))

    def feeds(self, by_length=False):
        return []


def _fake_int8(monkeypatch, tmp_path, table, seconds, matmuls=("m0", "m1", "m2")):
    from export import quantize

    class Runner:
        def __init__(self, path):
            self.path = path

        def __call__(self, feeds):
            return None

    files = iter(range(100))
    monkeypatch.setattr(build, "_fp32_onnx", lambda *a: (tmp_path / "fp32.onnx", None, {"graph": {"applied": "x"}}))
    monkeypatch.setattr(quantize, "prepare", lambda src, dst: dst)
    monkeypatch.setattr(quantize, "recipes", lambda src, pc: [quantize.Recipe("dynamic", True), quantize.Recipe("dynamic", False)])
    monkeypatch.setattr(quantize, "weight_matmuls", lambda src: list(matmuls))
    monkeypatch.setattr(quantize, "quantize", lambda src, path, recipe, feeds: {"recipe": recipe.label, "n": next(files)})
    monkeypatch.setattr(build, "onnx_runner", lambda path, *a: (Runner(path), "fake"))
    monkeypatch.setattr(build, "_race", lambda runners, verifier: {name: seconds.get(name, 1.0) for name in runners})
    verifier = _FakeVerifier(table)
    lines = io.StringIO()
    opts = build.ExportOptions(precision="int8", progress=Progress(stream=lines))
    return build._int8_onnx(None, tmp_path / "fp32.onnx", tmp_path, opts, verifier), verifier, lines.getvalue()


def test_int8_sensitivity_ranks_with_the_sorted_check_and_every_candidate_takes_the_full_one(tmp_path, monkeypatch):
    table = {(f"int8.{i}.onnx", False): 0.98 for i in range(2)}  # no recipe passes with every MatMul int8
    table.update({("int8.alone.onnx", True): 0.999, ("int8.2.onnx", False): 0.991,
                  ("int8.3.onnx", False): 0.985})  # bisection: 2 fp32 MatMuls pass, 1 does not
    (path, report, extra), verifier, log = _fake_int8(monkeypatch, tmp_path, table, {})
    assert "int8: no recipe passes with every MatMul in int8; the damage of each of 3 MatMuls alone" in log
    for i, name in enumerate(("m0", "m1", "m2"), 1):
        assert re.search(rf"int8 sensitivity {i}/3 {name}: damage 0\.00100 \(quantize \d+\.\d s, parity \d+\.\d s\)", log)
    assert re.search(r"int8 dynamic\+per_channel\+2_fp32: min cos 0\.99100, passes the gate \(quantize \d+\.\d s, parity", log)
    assert path.name == "int8.2.onnx" and report.passed and extra["graph"]["sensitivity"]["matmuls"]["m1"] > 0
    assert verifier.calls == [("int8.0.onnx", False), ("int8.1.onnx", False), *[("int8.alone.onnx", True)] * 3,
                              ("int8.2.onnx", False), ("int8.3.onnx", False)]
    assert extra["graph"]["recipe"] == "dynamic+per_channel+2_fp32"


def test_the_sorted_check_measures_the_same_rows(tiny_model):
    from export.parity import GATES

    verifier = build.Verifier(tiny_model, "fp32", {}, 4, 16, "cpu")
    seen = []

    def runner(feeds):  # a vector per row from its own tokens only, whatever the batch
        seen.append(feeds["input_ids"].size)
        rows = zip(feeds["input_ids"], feeds["attention_mask"])
        return np.stack([np.bincount(ids[mask == 1] % 32, minlength=32).astype(np.float32) for ids, mask in rows])

    verifier.reference = runner(tiny_model.tokenizer(verifier.inputs))
    full = verifier.check(runner, "x")
    padded = sum(seen)
    seen.clear()
    fast = verifier.check(runner, "x", fast=True)
    assert full.parity == fast.parity and full.parity.max_abs == 0.0 and full.gate == GATES["fp32"]
    assert sum(seen) < padded / 2  # the sorted batches compute far fewer padded positions
