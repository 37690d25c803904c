"""Export leftovers and system errors: a killed export's temp folder is removed by the next one, a full disk is a
one-line message with exit 2."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import export.build as build
from export.__main__ import main as export_main
from runtime.locks import OWNER_FILE
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
    from runtime.locks import owned_temp_dir, remove_stale_dirs

    with owned_temp_dir(tmp_path, ".x.onnx.tmp-") as live:
        old = time.time() - 60
        os.utime(live / OWNER_FILE, (old, old))
        assert remove_stale_dirs(tmp_path, ".x.onnx.tmp-") == [] and live.is_dir()


def test_a_full_disk_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "fp32.onnx"))

    monkeypatch.setattr(build, "export_onnx", full)
    assert export_main([str(TINY), "--out", str(tmp_path / "x.onnx")]) == 2
    err = capsys.readouterr().err
    assert "No space left on device; no engine was written" in err and "Traceback" not in err
    assert not (tmp_path / "x.onnx").exists() and not list(tmp_path.glob(".x.onnx.tmp-*"))
