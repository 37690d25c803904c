"""Resumption after SIGKILL: a real ``python -m runtime.encode`` process is killed at chosen points (while paused
at a point by ``tests.encode_hooked``, or by that wrapper itself), and the resumed output is byte-identical to an
uninterrupted run."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_runtime import ROOT, mixed_length_texts

ROWS = 100
SHARD = 8  # 13 shards


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("resume") / "docs.jsonl"
    rows = [{"id": f"d{i}", "text": t if isinstance(t, str) else t[1]} for i, t in enumerate(mixed_length_texts(ROWS, seed=3))]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def command(engine: Path, src: Path, out: Path, *extra: str) -> list[str]:
    return ["--engine", str(engine), "--input", str(src), "--output", str(out),
            "--instruction", "Represent the document for retrieval: ", "--shard-rows", str(SHARD), "--quiet", *extra]


def run(args: list[str], hook: str | None = None) -> subprocess.CompletedProcess:
    """The CLI in a subprocess; with ``hook`` ("kill@POINT") through ``tests.encode_hooked``."""
    prefix = ["-m", "tests.encode_hooked", hook] if hook else ["-m", "runtime.encode"]
    return subprocess.run([sys.executable, *prefix, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def run_until_paused_then_kill(args: list[str], point: str) -> int:
    """Start the CLI, wait until it reports being paused at ``point``, then SIGKILL it from here."""
    cmd = [sys.executable, "-m", "tests.encode_hooked", f"pause@{point}", *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:
            if line.strip() == f"PAUSED {point}":
                proc.send_signal(signal.SIGKILL)
                break
        return proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()


def resumed_rows(out: Path) -> int:
    return json.loads(Path(f"{out}.summary.json").read_text())["resumed_rows"]


def test_npy_resumes_after_sigkill_at_every_stage(tiny_engine, corpus, tmp_path):
    ref = tmp_path / "ref.npy"
    assert run(command(tiny_engine, corpus, ref)).returncode == 0
    out = tmp_path / "out.npy"
    cmd = command(tiny_engine, corpus, out)
    parts = Path(f"{out}.parts")

    # 1. killed from outside while paused after committing shard 3
    assert run_until_paused_then_kill(cmd, "commit:3") == -signal.SIGKILL
    assert not out.exists() and parts.is_dir()
    # a different command does not reuse those shards
    other = run(command(tiny_engine, corpus, out, "--batch-size", "5"))
    assert other.returncode == 2 and "differs in: batch_size" in other.stderr
    # 2. killed after shard 6's file is written but before the state records it
    assert run(cmd, hook="kill@save:6").returncode == -signal.SIGKILL
    # 3. killed after assembling the output, before the rename
    assert run(cmd, hook="kill@publish").returncode == -signal.SIGKILL
    assert not out.exists()
    # 4. killed after the rename, before the parts folder is removed
    assert run(cmd, hook="kill@summary").returncode == -signal.SIGKILL
    assert out.exists() and parts.is_dir()
    # 5. the same command finishes the job
    final = run(cmd)
    assert final.returncode == 0, final.stderr
    assert out.read_bytes() == ref.read_bytes()
    assert resumed_rows(out) == ROWS and not parts.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left beside the output


def test_parquet_resume_is_byte_identical(tiny_engine, corpus, tmp_path):
    pytest.importorskip("pyarrow")
    extra = ("--id-field", "id", "--dtype", "float16")
    ref = tmp_path / "ref.parquet"
    assert run(command(tiny_engine, corpus, ref, *extra)).returncode == 0
    out = tmp_path / "out.parquet"
    cmd = command(tiny_engine, corpus, out, *extra)
    assert run_until_paused_then_kill(cmd, "commit:5") == -signal.SIGKILL
    final = run(cmd)
    assert final.returncode == 0, final.stderr
    assert resumed_rows(out) == 5 * SHARD
    assert out.read_bytes() == ref.read_bytes()


def test_overwrite_discards_unfinished_work(tiny_engine, corpus, tmp_path):
    out = tmp_path / "out.npy"
    cmd = command(tiny_engine, corpus, out)
    assert run(cmd, hook="kill@commit:2").returncode == -signal.SIGKILL
    again = run(cmd + ["--overwrite"])
    assert again.returncode == 0 and resumed_rows(out) == 0


@pytest.mark.parametrize("damage,why", [
    (lambda s: json.dumps(s)[:60], "unreadable"),
    (lambda s: json.dumps({**s, "shards": None}), "'shards' is NoneType, not a list"),
    (lambda s: json.dumps({**s, "shards": [1, 2]}), "shard 0 is int, not an object"),
    (lambda s: json.dumps({**s, "shards": [{**s["shards"][0], "rows": "8"}]}), "shard 0: 'rows' is \"8\", not a count"),
    (lambda s: json.dumps({**s, "shards": [{k: v for k, v in s["shards"][0].items() if k != "input_digest"}]}),
     "shard 0: 'input_digest' missing or not a string"),
])
def test_a_damaged_state_file_is_one_line_naming_it(tiny_engine, corpus, tmp_path, damage, why):
    """A damaged OUTPUT.parts/state.json was a traceback (issue 32): now one line, the file, and --overwrite."""
    out = tmp_path / "out.npy"
    cmd = command(tiny_engine, corpus, out)
    assert run(cmd, hook="kill@commit:2").returncode == -signal.SIGKILL
    state = Path(f"{out}.parts") / "state.json"
    state.write_text(damage(json.loads(state.read_text())))
    again = run(cmd)
    assert again.returncode == 2 and "Traceback" not in again.stderr and len(again.stderr.splitlines()) == 1
    assert again.stderr.startswith(f"error: {state}: damaged state file: {why}")
    assert again.stderr.rstrip().endswith("pass --overwrite to start again")
    assert run(cmd + ["--overwrite"]).returncode == 0 and resumed_rows(out) == 0
