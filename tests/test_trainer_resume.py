"""Kill a real training process (SIGKILL) after a checkpoint, resume it, and get the uninterrupted run's weights."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from trainer import InstructorModel

FIXTURES = Path(__file__).parent / "fixtures"
ROOT = Path(__file__).parent.parent
STEPS, SAVE = 24, 4


def _cmd(out: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "trainer", "--model_name_or_path", str(FIXTURES / "instructor-tiny"),
        "--data", str(FIXTURES / "medi" / "medi-tiny.json"), "--output_dir", str(out),
        "--per_device_train_batch_size", "4", "--max_steps", str(STEPS), "--save_steps", str(SAVE),
        "--max_source_length", "48", "--grad_cache_chunk_size", "6", *extra,
    ]  # fmt: skip


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


@pytest.mark.slow
def test_kill_and_resume_gives_the_uninterrupted_weights(tmp_path):
    """Dropout on (the tiny model's 0.1), several epochs of 7 steps, GradCache: RNG, data position and optimizer resume."""
    full = subprocess.Popen(_cmd(tmp_path / "full"), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    killed = subprocess.Popen(_cmd(tmp_path / "killed"), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = tmp_path / "killed" / "checkpoints" / f"checkpoint-{SAVE}"
    deadline = time.monotonic() + 240
    while not first.is_dir() and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    killed.send_signal(signal.SIGKILL)
    assert killed.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (tmp_path / "killed" / "modules.json").exists()  # it never reached the final save
    done = [p.name for p in (tmp_path / "killed" / "checkpoints").iterdir()]
    assert f"checkpoint-{SAVE}" in done and all(p.startswith("checkpoint-") for p in done)

    resumed = subprocess.run(
        _cmd(tmp_path / "killed", "--resume_from_checkpoint", "latest"), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    assert full.wait(timeout=300) == 0, full.stderr.read()[-3000:]

    a, b = load_file(tmp_path / "full" / "model.safetensors"), load_file(tmp_path / "killed" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key] == b[key]).all(), f"{key} differs after resume"
    dense_a = load_file(tmp_path / "full" / "2_Dense" / "model.safetensors")["linear.weight"]
    dense_b = load_file(tmp_path / "killed" / "2_Dense" / "model.safetensors")["linear.weight"]
    assert (dense_a == dense_b).all()
    start = InstructorModel.from_pretrained(FIXTURES / "instructor-tiny").dense.weight.detach()
    assert not (dense_a == start).all()  # training moved the weights
    logs = [[json.loads(x) for x in (tmp_path / r / "train_log.jsonl").read_text().splitlines()] for r in ("full", "killed")]
    assert [r["step"] for r in logs[1]] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in logs[0]] == [r["loss"] for r in logs[1]]


def test_existing_checkpoints_need_resume_or_overwrite(tmp_path):
    (tmp_path / "out" / "checkpoints" / "checkpoint-3").mkdir(parents=True)
    proc = subprocess.run(_cmd(tmp_path / "out"), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--resume_from_checkpoint latest" in proc.stderr


@pytest.mark.slow
def test_trained_folder_loads_in_export_and_sentence_transformers(tmp_path):
    out = tmp_path / "out"
    cmd = _cmd(out)
    cmd[cmd.index("--max_steps") + 1] = "2"
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    ours = InstructorModel.from_pretrained(out)
    st = pytest.importorskip("sentence_transformers").SentenceTransformer(str(out), device="cpu")
    texts = ["a plain sentence", "another one, longer than the first"]
    assert abs(st.encode(texts) - ours.encode(texts)).max() <= 1e-5
    from export.__main__ import main as export_main

    assert export_main([str(out), "--out", str(tmp_path / "m.onnx"), "--calib-max-batch", "2"]) == 0
    assert (tmp_path / "m.onnx.manifest.json").is_file()
